"""`reasonembed serve`: run the embedding service on 127.0.0.1:<port> until interrupted.

    reasonembed serve --model minilm --port 8000 [--index runs/<run>/encode] [--api-key-file key.txt] [a.b=c ...]
    python serve/launch.py --config configs/serve/local-tiny.yaml port=8011   (the same, from a checkout)

Attaches to RAY_ADDRESS / ray.address when set, else starts a private local Ray cluster bound to 127.0.0.1. On
Ctrl-C or SIGTERM the application is deleted (and a private cluster shut down). Exit codes: 0 after a clean stop,
2 for config errors (the message names the field path), 1 when the application fails to start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from reasonembed.config.base import ConfigError, load_model
from reasonembed.config.serve import ServeJobConfig


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="reasonembed serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML config (e.g. configs/serve/local-tiny.yaml); defaults apply without it")
    ap.add_argument("--model", help="model reference: minilm, tiny-qwen3, a folder or a hub name")
    ap.add_argument("--port", type=int, help="HTTP port on 127.0.0.1")
    ap.add_argument("--index", help="encode output folder (or index folder) for /v1/search; local or s3://")
    ap.add_argument("--api-key-file", dest="api_key_file", help="file holding the bearer API key")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batching.max_batch_size=64")
    return ap.parse_args(argv)


def load_config(ns: argparse.Namespace) -> ServeJobConfig:
    """Config file, then flags (mapped by ServeJobConfig.FLAGS), then dotted overrides."""
    flags = [f"{field}={getattr(ns, flag)}" for flag, field in ServeJobConfig.FLAGS.items()
             if getattr(ns, flag, None) is not None]
    for item in ns.overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. port=8001")
    return load_model(ServeJobConfig, ns.config, flags + list(ns.overrides))


def preflight(cfg: ServeJobConfig) -> None:
    """Fail before starting Ray on problems the user can fix from the command line (e.g. an API-key variable that
    is set but empty, which would otherwise leave the service open)."""
    from reasonembed.serving.auth import AuthConfigError, load_api_key
    from reasonembed.serving.search import resolve_index_uri

    try:
        load_api_key(cfg.auth)
    except AuthConfigError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.index:
        try:
            resolve_index_uri(cfg.index, cfg.storage)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from exc


def cluster_env(cfg: ServeJobConfig) -> bool:
    """Whether this process starts its own cluster; if so, sets the Ray Serve variables that cluster must start
    with. ConfigError when direct ingress is asked of an existing cluster that was not started for it."""
    import ray

    from reasonembed.serving.runner import DIRECT_INGRESS_FLAG, FAST_PATH_ENV, direct_ingress_env

    owns_cluster = not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if owns_cluster:
        for key, value in FAST_PATH_ENV.items():
            os.environ.setdefault(key, value)  # the user's environment wins
        if cfg.ingress == "direct":
            os.environ.update(direct_ingress_env(cfg.port))  # must match the config
    elif cfg.ingress == "direct" and os.environ.get(DIRECT_INGRESS_FLAG) != "1":
        flags = " ".join(f"{k}={v}" for k, v in direct_ingress_env(cfg.port).items())
        raise ConfigError(f"ingress: 'direct' on an existing cluster needs Ray started with direct ingress "
                          f"(e.g. {flags} ray start ...) and {DIRECT_INGRESS_FLAG}=1 here; or set ingress=proxy")
    return owns_cluster


def ready_line(cfg: ServeJobConfig, base: str, info: dict, proxy_port: int, auth: bool) -> str:
    """The start-up line: where to send requests, and plainly whether they need an API key."""
    return (f"reasonembed serve: {info['model']} ready on {base} (OpenAI base_url {base}/v1"
            f"{', search on ' + info['index']['uri'] if info.get('index') else ''}"
            f"{f'; direct ingress, Serve proxy on port {proxy_port}' if cfg.ingress == 'direct' else ''}"
            f"{'; API key required' if auth else '; NO AUTH: no API key configured, anyone who can reach it can use it'}"
            "); Ctrl-C to stop")


def teardown(app_name: str | None, owns_cluster: bool) -> None:
    """Delete the application (when it was deployed) and stop the cluster this process started."""
    import ray
    from ray import serve

    if app_name is not None:
        try:
            serve.delete(app_name)
        except Exception as exc:  # shutting down anyway; report and go on
            print(f"warning: could not delete the application: {exc}", file=sys.stderr)
    if owns_cluster:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(ns)
        preflight(cfg)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2

    from reasonembed.runtime import apply_env_defaults

    # Before `import ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import, and without it a cluster started
    # here would bind its servers to the machine's network address (see runtime.apply_env_defaults), not to
    # 127.0.0.1.
    apply_env_defaults()
    from ray import serve

    from reasonembed.runtime import connect_ray, setup_logging
    from reasonembed.serving.auth import load_api_key
    from reasonembed.serving.runner import start_serve, wait_ready

    setup_logging()
    try:
        owns_cluster = cluster_env(cfg)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    connect_ray(cfg.ray)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployed = False
    try:
        proxy_port = start_serve(cfg.host, cfg.serve_proxy_port)
        if proxy_port != cfg.serve_proxy_port:
            hint = f"proxy_port={proxy_port}" if cfg.ingress == "direct" else f"--port {proxy_port}"
            print(f"error: Serve is already running on this cluster with its proxy on port {proxy_port}, not "
                  f"{cfg.serve_proxy_port}; use {hint}", file=sys.stderr)
            return 1
        from reasonembed.serving.http.app import build_app

        try:
            serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
            deployed = True
            base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
            api_key = load_api_key(cfg.auth)
            info = wait_ready(base, timeout_s=600, api_key=api_key)
        except Exception as exc:  # deployment failures arrive as several Ray exception types
            print(f"error: the application failed to start: {exc}", file=sys.stderr)
            return 1
        print(ready_line(cfg, base, info, proxy_port, auth=api_key is not None), flush=True)
        while not stop.wait(1.0):
            pass
        print("reasonembed serve: stopping", flush=True)
        return 0
    finally:
        teardown(cfg.app_name if deployed else None, owns_cluster)
