"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config configs/train/local-tiny.yaml`.

Same behaviour as `reasonembed train`: validates the config, then calls the library entry (see reasonembed.cli.ENTRIES).
"""

import sys

from reasonembed.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
