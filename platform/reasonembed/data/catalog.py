"""Task specs -> loaders: one place that maps ``"bright/biology"`` or ``"beir/scifact"`` to a ``RetrievalTask``.

Spec forms (what evaluate configs list):
- ``beir/<name>``, ``impliret/<name>``: a BEIR-layout folder under ``data_dir``;
- ``bright/<task>``: BRIGHT; the local folder ``<data_dir>/bright/<task>`` when it has ``corpus.jsonl``, else the hub
  (``source="auto"``), or forced with ``source="local"``/``"hub"``;
- ``r2med/<Task>``: R2MED, same rule;
- ``bright`` / ``r2med``: every task of the benchmark (``expand_specs``);
- a path to a folder that has a queries file (``queries.jsonl``, ``.jsonl.gz``, ``.parquet``, or R2MED's
  ``query.*``): a BEIR-layout folder in any of the variants ``reasonembed.data.beir`` accepts;
- ``s3://bucket/prefix``: a BEIR-layout folder on S3, reached with the ``storage`` settings (endpoint, region).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from reasonembed.config.base import StorageConfig
from reasonembed.data.beir import find_queries, load_beir_folder
from reasonembed.data.bright import BRIGHT_TASKS, load_bright
from reasonembed.data.r2med import R2MED_TASKS, load_r2med
from reasonembed.data.types import DataError, RetrievalTask
from reasonembed.storage import Location, is_s3

Source = Literal["auto", "local", "hub"]

BENCHMARKS: dict[str, tuple[str, ...]] = {"bright": BRIGHT_TASKS, "r2med": R2MED_TASKS}


def default_data_dir() -> Path:
    """``$REASONEMBED_DATA_DIR``, else ``../shared/data`` relative to the working directory."""
    return Path(os.environ.get("REASONEMBED_DATA_DIR", "../shared/data"))


def expand_specs(specs: list[str]) -> list[str]:
    """Expand whole-benchmark specs (``bright``, ``r2med``) into their task specs, keeping order and dropping
    repeats."""
    out: list[str] = []
    for s in specs:
        items = [f"{s}/{t}" for t in BENCHMARKS[s]] if s in BENCHMARKS else [s]
        out.extend(i for i in items if i not in out)
    return out


def load_task(
    spec: str,
    data_dir: str | Path | None = None,
    *,
    source: Source = "auto",
    require_corpus: bool = True,
    storage: StorageConfig | None = None,
) -> RetrievalTask:
    """Load the task named by ``spec`` (module docstring). ``storage`` is how ``s3://`` specs are reached (the job's
    ``cfg.storage``); None uses the environment (``AWS_ENDPOINT_URL``, ...)."""
    if is_s3(spec):
        return load_beir_folder(Location(spec, storage), require_corpus=require_corpus)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    as_path = Path(spec)
    if as_path.is_dir() and find_queries(as_path) is not None:
        return load_beir_folder(as_path, require_corpus=require_corpus)
    family, _, name = spec.partition("/")
    if not name:
        raise DataError(f"task spec {spec!r}: expected '<benchmark>/<task>' (e.g. bright/biology) or a folder path")
    folder = root / family / name
    if family in ("bright", "r2med"):
        local_ok = (folder / "corpus.jsonl").is_file() or (folder.is_dir() and not require_corpus)
        if source == "local" or (source == "auto" and local_ok):
            if not folder.is_dir():
                raise DataError(f"task spec {spec!r}: no local folder {folder}")
            if family == "bright":
                return load_bright(name, data_dir=folder, require_corpus=require_corpus)
            return load_r2med(name, data_dir=folder)
        try:
            if family == "bright":
                return load_bright(name, require_corpus=require_corpus)
            return load_r2med(name)
        except DataError as exc:
            if source == "auto" and folder.is_dir():
                raise DataError(
                    f"task spec {spec!r}: the local folder {folder} has no corpus.jsonl, and loading from the hub "
                    f"failed: {exc}"
                ) from exc
            raise
    if source == "hub":
        raise DataError(f"task spec {spec!r}: only bright/* and r2med/* can be loaded from the hub")
    if not folder.is_dir():
        raise DataError(f"task spec {spec!r}: folder {folder} not found (data_dir={root})")
    return load_beir_folder(folder, name=name, benchmark=family, require_corpus=require_corpus)
