"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate/local-tiny.yaml`.

Same behaviour as `reasonembed evaluate`: validates the config, then calls the library entry (see reasonembed.cli.ENTRIES).
"""

import sys

from reasonembed.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", sys.argv[1:]))
