"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/encode.py --config configs/encode/local-tiny.yaml`.

Same behaviour as `reasonembed encode`: validates the config, then calls the library entry (see reasonembed.cli.ENTRIES).
"""

import sys

from reasonembed.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("encode", sys.argv[1:]))
