"""The end-to-end embedded default, as `make demo` runs it: python jobs/pipeline.py [--generator HF_MODEL] [--out DIR].

Starts a private Ray head on 127.0.0.1, submits synthesize -> train -> encode -> evaluate as Ray jobs, serves the
trained model once, stops everything and prints a summary (reasonembed.workflow).
"""

import argparse
import sys

from reasonembed.runtime import apply_env_defaults, setup_logging
from reasonembed.workflow import DemoOptions, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs", help="run root (local folder)")
    ap.add_argument("--run-id", default="demo")
    ap.add_argument("--generator", default=None, help="model for generation and annotation (default: the preset's smollm2-135m)")
    ap.add_argument("--no-base-eval", action="store_true", help="skip evaluating the base model")
    ap.add_argument("--sequential", action="store_true",
                    help="evaluate the base model after the chain instead of beside it (one job at a time)")
    ap.add_argument("--smoke", action="store_true", help="only the engine smoke test (vLLM via Ray Data + MiniLM)")
    ap.add_argument("--verbose", action="store_true",
                    help="stream every job's full log (Ray, Ray Data, vLLM) to the console instead of one progress "
                    "line per step with the logs in <out>/<run-id>/logs/ (also REASONEMBED_VERBOSE=1)")
    args = ap.parse_args()
    apply_env_defaults()
    setup_logging()
    if args.smoke:
        import json

        from reasonembed.smoke import run as smoke

        print(json.dumps(smoke(), indent=2))
        sys.exit(0)
    steps = run(DemoOptions(out=args.out, run_id=args.run_id, generator=args.generator,
                            eval_base=not args.no_base_eval, overlap_base=not args.sequential,
                            verbose=args.verbose or None))
    sys.exit(0 if all(s.status == "SUCCEEDED" for s in steps) else 1)
