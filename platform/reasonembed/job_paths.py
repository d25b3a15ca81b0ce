"""Every input path a job reads, checked before the job writes anything, with a hint for Ray's working-dir copy.

``ray job submit --working-dir . -- python jobs/<verb>.py ...`` does not run the entrypoint where you typed it: Ray
uploads the folder and the driver starts in an unpacked copy under the head's temp dir
(https://docs.ray.io/en/latest/ray-core/handling-dependencies.html#remote-uris, "working_dir"). A relative path such
as ``../shared/data/beir/scifact`` or ``runs`` then means a folder inside that copy: inputs are not found and
outputs land in a temp folder Ray deletes. The documented command lines therefore pass absolute paths (``"$PWD/..."``,
expanded by your shell before Ray sees them) and ``--data-dir``; ``reasonembed submit`` makes relative paths absolute
for you. When a path is missing inside such a copy, the error says so.

:func:`check_input_paths` is called by every job entry (``reasonembed.cli.run_job``) right after its config is
validated, so a wrong path costs seconds and leaves no stage folder behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reasonembed.config import ConfigError

# Set by Ray's job supervisor in a submitted job's driver: the job's runtime env, including its working_dir.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_working_dir_copy() -> bool:
    """True inside the driver of a job submitted with a ``working_dir`` (cwd is Ray's unpacked copy)."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def relative_path_hint(path: str) -> str:
    """What to do about a missing relative ``path``: empty unless it is relative and we run in Ray's copy."""
    if "://" in path or Path(path).is_absolute() or not in_ray_working_dir_copy():
        return ""
    return (f" [this job runs in Ray's copy of the working dir ({Path.cwd()}), where relative paths resolve: pass "
            "absolute paths (e.g. \"$PWD/...\" and --data-dir \"$PWD/../shared/data\" on the `ray job submit` line) "
            "or use `reasonembed submit`, which makes them absolute]")


def _expand(path: str) -> str:
    from reasonembed.data.catalog import default_data_dir

    return path.replace("{data_dir}", str(default_data_dir()))


def _synthesize(cfg: Any) -> list[tuple[str, str]]:
    paths = [("data.corpus", cfg.data.corpus)]
    if cfg.data.decontamination.benchmark != "none" and cfg.data.decontamination.path:
        paths.append(("data.decontamination.path", cfg.data.decontamination.path))
    return paths


def _evaluate(cfg: Any) -> list[tuple[str, str]]:
    # Task specs are resolved (and refused with the data_dir they looked in) by the catalog before any work; only
    # an explicit data_dir is a path of its own.
    return [("data_dir", cfg.data_dir)] if cfg.data_dir else []


# verb -> (config -> [(field path, path as configured)]). Output folders are not inputs: they are created.
INPUTS: dict[str, Callable[[Any], list[tuple[str, str]]]] = {
    "encode": lambda cfg: [("data.path", cfg.data.path)] if cfg.data.path else [],
    "synthesize": _synthesize,
    "audit-annotator": lambda cfg: [("data", cfg.data)],
    "train": lambda cfg: [(f"data.paths[{i}]", p) for i, p in enumerate(cfg.data.paths)],
    "evaluate": _evaluate,
}


def input_paths(verb: str, cfg: Any) -> list[tuple[str, str]]:
    """``[(field path, expanded path)]`` of every input path of a ``verb`` job config (``{data_dir}`` filled in)."""
    picker = INPUTS.get(verb)
    return [(field, _expand(str(p))) for field, p in (picker(cfg) if picker else [])]


def check_input_paths(verb: str, cfg: Any) -> None:
    """Raise one ConfigError listing every input path of ``cfg`` that does not exist (local or ``s3://``)."""
    from reasonembed.storage import Location

    missing = []
    for field, path in input_paths(verb, cfg):
        try:
            found = Location(path, getattr(cfg, "storage", None)).exists()
        except Exception as exc:  # an unreachable S3 endpoint: report it with the field, like a missing path
            missing.append(f"{field}: cannot check {path}: {exc}")
            continue
        if not found:
            missing.append(f"{field}: not found: {path}{relative_path_hint(path)}")
    if missing:
        raise ConfigError("input paths:\n  " + "\n  ".join(missing))
