"""Entrypoint: `python serve/launch.py --config configs/serve/local-tiny.yaml [--port 8000] [a.b=c ...]`.

Same behaviour as `reasonembed serve` (see reasonembed.serving.http.launch, where the service is started).
"""

import sys

from reasonembed.serving.http.launch import main

if __name__ == "__main__":
    sys.exit(main())
