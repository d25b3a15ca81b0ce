"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/synthesize.py --config configs/synthesize/local-tiny.yaml`.

Same behaviour as `reasonembed synthesize`: validates the config, then calls the library entry (see reasonembed.cli.ENTRIES).
Same flags too, e.g. `--retry-errors` (re-send the error rows of finished LLM stages; config field retry_errors) and
`--overwrite` (redo stages whose config or inputs changed instead of refusing).
"""

import sys

from reasonembed.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("synthesize", sys.argv[1:]))
