"""Starting Serve on loopback and waiting for an application to become ready (used by launch.py and tests)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


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
