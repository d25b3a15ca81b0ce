"""Process set-up shared by every job: offline-safe environment defaults and attaching to (or starting) Ray.

Why these defaults (FIELD-NOTES.md): Ray binds to the machine's network address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; token auth switches itself on when ~/.ray/auth_token exists unless RAY_AUTH_MODE
is explicit; vLLM's CPU build reserves ~20 GiB of KV cache unless VLLM_CPU_KVCACHE_SPACE is set.
"""

from __future__ import annotations

import logging
import os

from reasonembed.config.base import RayConfig

log = logging.getLogger("reasonembed")

ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_env_defaults() -> None:
    """Set the environment defaults above without overriding what the user exported."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def connect_ray(cfg: RayConfig | None = None):
    """Attach to the configured cluster, to RAY_ADDRESS (set inside `ray job submit`), or start a local one.

    A local cluster binds to 127.0.0.1 only and gets a capped object store. Returns the ``ray`` module.
    """
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return ray
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray cluster on 127.0.0.1")
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory_mb * 2**20,
            include_dashboard=cfg.include_dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
        )
    return ray
