"""Starting Serve on loopback and waiting for an application to become ready (used by launch.py and tests)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

# Ray Serve flags for a cluster `reasonembed serve` starts itself (read by the Serve processes at start-up). User
# code on the replica's own event loop saves a cross-thread hand-off per request (our routes never block it: forward
# passes and long tokenisations run in worker threads), and replica logs go to their files only instead of also
# streaming through Ray's log monitor to the terminal. Measured with bench/serve.py on the 2-core box, local preset
# (proxy ingress), one round each: 22.7 / 28.9 / 31.1 req/s at concurrency 1 / 8 / 32 without them, 24.8 / 29.7 /
# 32.1 with them.
FAST_PATH_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_LOG_TO_STDERR": "0"}
DIRECT_INGRESS_FLAG = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve direct ingress with the replica port range pinned to ``[port, port + 1)``: the (single) ingress
    replica then serves HTTP on ``port`` itself, and Serve's proxy must listen elsewhere. Ray reads these when
    the Serve controller and replicas start, so they belong in the environment of ``ray start`` / ``ray.init``."""
    return {DIRECT_INGRESS_FLAG: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}


def start_serve(host: str = "127.0.0.1", port: int = 8000) -> int:
    """Start Serve's HTTP proxy on ``host:port`` (or attach to a running Serve); returns the port it listens on.

    Serve keeps the HTTP options of the instance that was started first, so callers compare the returned port
    with the one they asked for.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": host, "port": port})
    return int(_get_global_client().http_config.port)


def wait_ready(base_url: str, timeout_s: float = 300.0, api_key: str | None = None) -> dict:
    """Poll ``GET /ready`` until it answers 200; returns its JSON. TimeoutError with the last answer otherwise."""
    deadline = time.time() + timeout_s
    last = "no answer"
    while time.time() < deadline:
        req = urllib.request.Request(base_url.rstrip("/") + "/ready")
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s (last: {last})")
