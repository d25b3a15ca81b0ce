"""Process set-up shared by every job: offline-safe environment defaults, logging, and attaching to (or starting) Ray.

Why these defaults (docs/operations.md, "Ray on one machine"): Ray binds to the machine's network address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; token auth switches itself on when ~/.ray/auth_token exists unless RAY_AUTH_MODE
is explicit; vLLM's CPU build reserves ~20 GiB of KV cache unless VLLM_CPU_KVCACHE_SPACE is set.

Quiet mode (one log file per job, ``--verbose`` to turn it off) lives in ``reasonembed.job_logging``;
:func:`connect_ray` applies it to Ray when it is on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from reasonembed import job_logging
from reasonembed.config.base import RayConfig
from reasonembed.job_logging import setup_logging

log = logging.getLogger("reasonembed")

# setup_logging lives with the rest of job logging; re-exported because every entrypoint imports it from here.
__all__ = ["ENV_DEFAULTS", "apply_env_defaults", "connect_ray", "setup_logging"]

ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _faiss_has_only_generic_module() -> bool:
    spec = importlib.util.find_spec("faiss")
    if spec is None or not spec.submodule_search_locations:
        return False
    names = {p.name for loc in spec.submodule_search_locations for p in Path(loc).glob("*swigfaiss*")}
    return bool(names) and not any("avx" in n or "sve" in n for n in names)


def apply_env_defaults() -> None:
    """Set the environment defaults above without overriding what the user exported."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # faiss's loader first tries `faiss.swigfaiss_avx512`/`_avx2` and logs the ImportError (with the traceback text
    # `ModuleNotFoundError("No module named 'faiss.swigfaiss_avx2'")`) before it falls back to `faiss.swigfaiss`
    # (https://github.com/facebookresearch/faiss/blob/main/faiss/python/loader.py). faiss-cpu >= 1.10 wheels ship only
    # that one module, built with dynamic dispatch (get_compile_options(): "OPTIMIZE DD AVX2 AVX512 ..."), so
    # FAISS_OPT_LEVEL=generic skips the doomed attempts at no speed cost. Only set when the installed faiss has no
    # per-ISA module, where it would pick a slower build; inherited by the Ray workers this process starts.
    if "FAISS_OPT_LEVEL" not in os.environ and _faiss_has_only_generic_module():
        os.environ["FAISS_OPT_LEVEL"] = "generic"


def connect_ray(cfg: RayConfig | None = None):
    """Attach to the configured cluster, to RAY_ADDRESS (set inside `ray job submit`), or start a local one.

    A local cluster binds to 127.0.0.1 only and gets a capped object store. Returns the ``ray`` module. In quiet mode
    (:func:`setup_job_logging`) Ray's logs and its workers' forwarded output go to the job's log file.
    """
    apply_env_defaults()
    import ray

    quiet = job_logging.active()
    if quiet:
        job_logging.open_log_file()  # real work starts: from here on the file exists and fills as the job runs
        job_logging.route_loggers()  # before ray.init, whose own INFO lines then go to the file
    if ray.is_initialized():
        if quiet:
            job_logging.route_after_init()
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
    if quiet:
        # After ray.init: a local raylet (and so every worker) inherits this process's environment at start, and
        # RAY_DATA_LOGGING_CONFIG is meant for this driver only.
        job_logging.route_after_init()
    return ray
