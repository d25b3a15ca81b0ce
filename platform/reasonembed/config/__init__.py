"""Job configs: pydantic v2 models, YAML loading with dotted overrides, and field-path errors.

``load_job_config("encode", "configs/encode/local-tiny.yaml", ["embedder.model=minilm"])`` returns a validated
``EncodeJobConfig``. Each job's model lives in its own module here; this package maps verbs to them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from reasonembed.config.base import (
    ConfigError,
    JobConfig,
    RayConfig,
    StorageConfig,
    StrictModel,
    apply_overrides,
    config_hash,
    load_model,
)
from reasonembed.config.embedder import EmbedderConfig

# verb -> "module:Class". Imported lazily so that `reasonembed doctor` does not import every job.
JOB_CONFIGS: dict[str, str] = {
    "encode": "reasonembed.config.encode:EncodeJobConfig",
    "evaluate": "reasonembed.config.evaluate:EvaluateJobConfig",
    "synthesize": "reasonembed.config.synthesize:SynthesizeJobConfig",
    "train": "reasonembed.config.train:TrainJobConfig",
    "serve": "reasonembed.config.serve:ServeJobConfig",
    "audit-annotator": "reasonembed.config.audit:AuditJobConfig",
}


def job_config_class(verb: str) -> type[StrictModel]:
    """The config model of a job verb."""
    if verb not in JOB_CONFIGS:
        raise ConfigError(f"unknown job {verb!r}; known: {', '.join(sorted(JOB_CONFIGS))}")
    mod, _, cls = JOB_CONFIGS[verb].partition(":")
    return getattr(importlib.import_module(mod), cls)


def default_config_path(verb: str, repo_root: Path | None = None) -> Path:
    """configs/<verb>/local-tiny.yaml under the repository (or working directory)."""
    root = repo_root or Path.cwd()
    return root / "configs" / verb / "local-tiny.yaml"


def load_job_config(verb: str, path: str | Path | None, overrides: list[str] | None = None) -> StrictModel:
    """Validate a job config file plus overrides; raises ConfigError naming the field path."""
    return load_model(job_config_class(verb), path, overrides)


__all__ = [
    "ConfigError",
    "EmbedderConfig",
    "JobConfig",
    "RayConfig",
    "StorageConfig",
    "StrictModel",
    "apply_overrides",
    "config_hash",
    "default_config_path",
    "job_config_class",
    "load_job_config",
    "load_model",
]
