"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/audit_annotator.py --config configs/audit-annotator/local-tiny.yaml`.

Same behaviour as `reasonembed audit-annotator`: validates the config, then calls the library entry (see
reasonembed.cli.ENTRIES).
"""

import sys

from reasonembed.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("audit-annotator", sys.argv[1:]))
