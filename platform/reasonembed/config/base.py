"""Strict pydantic base models shared by every job config, plus YAML loading and dotted overrides.

Every config model forbids unknown keys and gives every field a description (a test walks all models to check
this). Errors are reported as ``ConfigError`` whose message names the dotted field path, so a typo in
``train.lr`` reads ``train.lr: Input should be a valid number`` rather than a stack trace.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound="StrictModel")


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the field path and what is wrong."""


class StrictModel(BaseModel):
    """Base of all config models: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RayConfig(StrictModel):
    """How a job reaches (or starts) its Ray cluster."""

    address: str | None = Field(
        None,
        description="Ray cluster address. None: attach to RAY_ADDRESS if set (e.g. inside `ray job submit`), "
        "else start a private local cluster bound to 127.0.0.1. 'auto' attaches to the recorded cluster.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster (None: all cores).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started cluster (None: detect).")
    object_store_memory_mb: int = Field(
        1024, ge=78, description="Object store size of a locally started cluster, MiB (Ray's default is 30% of RAM)."
    )
    include_dashboard: bool = Field(False, description="Start the dashboard with a local cluster.")


class StorageConfig(StrictModel):
    """Where run outputs go and how S3-compatible stores are reached."""

    s3_endpoint: str | None = Field(
        None,
        description="Endpoint override for S3-compatible servers (MinIO, moto). None: AWS_ENDPOINT_URL or AWS.",
    )
    s3_region: str | None = Field(None, description="S3 region. None: AWS_DEFAULT_REGION or the SDK default.")


class JobConfig(StrictModel):
    """Fields every job shares: where it runs, where it writes, and under which run id."""

    run_id: str = Field("local-tiny", description="Run id: outputs go to <out>/<run_id>/<stage>/.", min_length=1)
    out: str = Field("runs", description="Run root: a local folder or an s3:// URI.")
    seed: int = Field(42, description="Seed for every sampling decision of the job.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Storage settings.")


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def format_validation_error(err: ValidationError, source: str = "") -> str:
    """One line per problem: ``<source>: <dotted.path>: <message>``."""
    prefix = f"{source}: " if source else ""
    lines = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see the preset configs for valid keys)"
        lines.append(f"{prefix}{_format_loc(e['loc'])}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so ``3``, ``true``, ``[1,2]`` and ``null`` get types."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict in order. Intermediate dicts are created as needed."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping top level is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_model(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Load ``model`` from a YAML file (optional) with dotted overrides; errors name the field path."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path) if path else "config")) from exc


def config_hash(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """sha256 (16 hex chars) of the canonical JSON of a config: equal configs give equal hashes."""
    payload = cfg.model_dump(mode="json", exclude=exclude)
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
