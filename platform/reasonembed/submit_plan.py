"""The offline half of `reasonembed submit`: validate, check resources, fix paths, build entrypoint and runtime env.

Nothing here talks to a cluster, so every bad input (unknown config key, a resource no node type provides, a config
outside the upload, a local path a remote cluster cannot read) fails before any upload. See reasonembed.submit for
the whole sequence.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from reasonembed.cluster_spec import check_resources, declares
from reasonembed.config import JOB_CONFIGS, job_config_class
from reasonembed.config.base import apply_overrides, load_model, read_yaml
from reasonembed.config.submit import SubmitOptions

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
ID_PREFIX = "reasonembed"


class SubmitError(RuntimeError):
    """Submission could not start (no cluster, bad paths); the message is meant to be shown as is."""


@dataclass
class SubmitPlan:
    """Everything needed to submit, computed offline by :func:`plan`."""

    verb: str
    run_id: str
    run_root: str
    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_resources: dict[str, float]
    entrypoint_num_cpus: float
    overrides: list[str]


def base_submission_id(run_id: str, verb: str) -> str:
    """``reasonembed-<run_id>-<verb>``, with anything outside ``[A-Za-z0-9._-]`` replaced (ids name log files)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{run_id}-{verb}")
    return f"{ID_PREFIX}-{safe}"


def submission_id(run_id: str, verb: str, attempt: int) -> str:
    """The id of attempt ``attempt`` (1-based) of ``verb`` in run ``run_id``: same inputs, same id."""
    return f"{base_submission_id(run_id, verb)}-{attempt}"


def _normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def is_loopback(address: str) -> bool:
    return (urlparse(_normalize_address(address)).hostname or "") in LOOPBACK


def _is_relative_local(value: str) -> bool:
    return "://" not in value and not Path(value).is_absolute()


def _relative_existing_paths(cfg: Any, here: Path, prefix: str = "") -> list[tuple[str, str]]:
    """Dotted keys of string fields that are relative paths to something that exists under ``here``.

    The job runs in an unpacked copy of the working dir, so on a cluster on this machine such paths are made
    absolute (what they mean where you run submit, as `reasonembed <verb>` would read them); on a remote cluster
    they cannot work at all. Lists are left alone (task lists hold catalog names such as ``beir/scifact``).
    """
    found: list[tuple[str, str]] = []
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                found += _relative_existing_paths(value, here, f"{path}.")
            elif isinstance(value, str) and _looks_like_path(value) and _exists(here / value):
                found.append((path, value))
    return found


def _looks_like_path(value: str) -> bool:
    """A one-line string short enough to be a file name: prompt templates (multi-line, long) are not paths, and
    asking the file system about them raises ``OSError: File name too long``."""
    return bool(value) and "\n" not in value and _is_relative_local(value)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a one-line string with a component over the file system's 255-byte name limit
        return False


def _job_config_dict(verb: str, config_path: Path, overrides: list[str]) -> dict[str, Any]:
    """Validate with the verb's model when it has one (errors name the field); else read the YAML as is."""
    if verb in JOB_CONFIGS:
        try:
            model = job_config_class(verb)
        except ModuleNotFoundError:
            model = None  # the verb's config module is not written yet: fall back to the raw mapping
        if model is not None:
            return load_model(model, config_path, overrides).model_dump(mode="json")
    return apply_overrides(read_yaml(config_path), overrides)


def plan(
    verb: str,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    options: SubmitOptions | None = None,
    script: str | None = None,
) -> SubmitPlan:
    """Steps 1-3 of the module docstring plus the entrypoint and runtime env; raises ConfigError or SubmitError."""
    opts = options or SubmitOptions()
    overrides = list(overrides)
    wd = Path(opts.working_dir).resolve()
    script = script or f"jobs/{verb.replace('-', '_')}.py"  # a verb's hyphens are underscores in module names
    if not (wd / script).is_file():
        raise SubmitError(f"{script} not found under {wd}: run from the repository root or pass --working-dir")
    cfg_path = Path(config_path).resolve()
    cfg_rel = _uploaded_config(config_path, cfg_path, wd, opts.excludes)
    cfg = _job_config_dict(verb, cfg_path, overrides)
    entry_res, entry_cpus = _driver_placement(cfg, opts)
    run_id = str(cfg.get("run_id") or "run")
    local = is_loopback(opts.address)
    here = Path.cwd()
    out = _absolute_paths(cfg, overrides, here, local, opts.address)
    run_root = f"{str(out).rstrip('/')}/{run_id}" if out else run_id
    entrypoint = shlex.join([opts.python, script, "--config", str(cfg_rel), *overrides])
    runtime_env = _runtime_env(opts, wd, here, local)
    return SubmitPlan(verb, run_id, run_root, entrypoint, runtime_env, entry_res, entry_cpus, overrides)


def _uploaded_config(config_path: str | Path, cfg_path: Path, wd: Path, excludes: list[str]) -> Path:
    """The config's path relative to the working dir. The job reads it from the uploaded copy, so a config outside
    the working dir, or under an excluded folder, would not be there: both are errors before any upload."""
    try:
        cfg_rel = cfg_path.relative_to(wd)
    except ValueError:
        raise SubmitError(
            f"config {config_path} is outside the uploaded working dir {wd}; put it under {wd}/configs/"
        ) from None
    # The same matcher Ray's packager uses on the working dir (gitwildmatch over paths relative to it).
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", excludes)
    if any(spec.match_file(str(Path(*cfg_rel.parts[:i]))) for i in range(1, len(cfg_rel.parts) + 1)):
        raise SubmitError(f"config {cfg_rel} is excluded from the upload (excludes: {', '.join(excludes)}); "
                          "move it to configs/")
    return cfg_rel


def _driver_placement(cfg: dict[str, Any], opts: SubmitOptions) -> tuple[dict[str, float], float]:
    """(custom resources, CPUs) for the driver, checked against the cluster spec when there is one.

    Unset options follow the spec: when it declares a ``driver`` resource the driver asks for it and one CPU (a
    real core on an on-demand CPU node); otherwise nothing, Ray's default (see :class:`SubmitOptions`).
    """
    if opts.cluster_spec:
        check_resources(cfg, opts.cluster_spec)
    has_driver_nodes = bool(opts.cluster_spec) and declares(opts.cluster_spec, "driver")
    entry_res = opts.entrypoint_resources
    if entry_res is None:
        entry_res = {"driver": 1.0} if has_driver_nodes else {}
    entry_cpus = opts.entrypoint_num_cpus
    if entry_cpus is None:
        entry_cpus = 1.0 if has_driver_nodes else 0.0
    if opts.cluster_spec and entry_res:
        check_resources({"entrypoint_resources": entry_res, "num_cpus": entry_cpus}, opts.cluster_spec)
    return entry_res, entry_cpus


def _absolute_paths(cfg: dict[str, Any], overrides: list[str], here: Path, local: bool, address: str) -> Any:
    """Append overrides that make the config's relative local paths absolute; returns the (possibly new) ``out``.

    The job runs in a temporary copy of the working dir: a relative ``out`` would vanish with it, and relative
    input paths would not resolve. On a cluster on this machine they become absolute (what they mean here); on a
    remote cluster they are an error naming the fix.
    """
    out = cfg.get("out")
    if isinstance(out, str) and _is_relative_local(out):
        if not local:
            raise SubmitError(
                f"out={out!r} is a relative local path: on the remote cluster at {address} it would land in "
                "the job's temporary working dir and vanish with it; set out=s3://<bucket>/<prefix> (or a path on a "
                "filesystem every node mounts)"
            )
        out = str((here / out).resolve())
        overrides.append(f"out={out}")
    for key, value in _relative_existing_paths(cfg, here):
        if key == "out":
            continue
        if not local:
            raise SubmitError(
                f"{key}={value!r} is a path on this machine; the cluster at {address} cannot read it. "
                "Upload the data (s3://...) and point the config there"
            )
        overrides.append(f"{key}={(here / value).resolve()}")
    return out


def _runtime_env(opts: SubmitOptions, wd: Path, here: Path, local: bool) -> dict[str, Any]:
    """The job's runtime env: the working dir upload minus excludes, REASONEMBED_* variables from here plus
    ``opts.env_vars``, and ``PYTHONPATH=platform`` when the working dir is a checkout of this library."""
    env = {k: v for k, v in os.environ.items() if k.startswith("REASONEMBED_")}
    if local:
        # The library's data dir defaults to ../shared/data relative to the working directory; pin what it is here.
        data_dir = here / env.get("REASONEMBED_DATA_DIR", "../shared/data")
        if data_dir.is_dir():
            env["REASONEMBED_DATA_DIR"] = str(data_dir.resolve())
    env.update(opts.env_vars)
    if (wd / "platform" / "reasonembed" / "__init__.py").is_file():
        # The library of the same checkout as jobs/: Ray starts the driver and every worker in the unpacked working
        # dir and puts it first on PYTHONPATH, followed by this entry, ahead of any installed release. (Not
        # py_modules: Ray applies `excludes` inside each module too, so a "data" pattern would drop reasonembed/data.)
        env["PYTHONPATH"] = os.pathsep.join(p for p in ("platform", opts.env_vars.get("PYTHONPATH")) if p)
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": list(opts.excludes)}
    if env:
        runtime_env["env_vars"] = env
    return runtime_env
