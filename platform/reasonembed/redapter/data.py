"""Read Redapter training samples into one Arrow table, with bad rows set aside in an error table.

Two input formats (docs/algorithm.md section 1, stage 4; the commit protocol in storage.py), both layouts of the
one sample schema (``reasonembed.schemas``):

- the platform's synthesis output: parquet parts in ``schemas.SAMPLE_SCHEMA`` (``sample_id, domain, prompt,
  query, reasoning_query, pos, neg, pos_ids, neg_ids, pos_scores, neg_scores, source_doc_id, train_group_size,
  batch_size, ...``);
- the public ReasonEmbed release (``hanhainebula/reason-embed-data``): JSON lines with ``schemas.RELEASE_COLUMNS``
  (``prompt, query, reasoning_query, pos, neg, train_group_size, batch_size``) and one file per domain, so the
  domain is the file stem when there is no ``domain`` field.

Either way training keeps ``schemas.TRAINING_COLUMNS`` cast to the sample schema's dtypes (so int64 and int32 group
sizes both become int32), in ``schemas.TRAINING_SCHEMA``.

Paths are files or folders, local or ``s3://`` (through ``reasonembed.storage``, i.e. pyarrow.fs). Folders are read
non-recursively, so a stage's ``errors/`` sub-folder and ``_manifest.json`` are never mistaken for samples.

Bad rows (no query, empty ``pos`` or ``neg``, a group or batch size below 1, a line that is not JSON) are not
silently dropped: with ``on_bad_row="skip"`` (default) they go to ``TrainingData.errors`` (source, row, sample_id,
domain, then the common reason, detail, raw_text; a broken JSON line is kept as raw_text), are counted and logged, and training goes on with the rest; with ``"raise"`` the first ones raise
a ``DataError`` naming file, row and field. Passages are held as Arrow lists (about the size of the text, unlike
Python strings), and only the rows of the current batch are turned into Python objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from reasonembed import schemas
from reasonembed.config.base import StorageConfig, StrictModel
from reasonembed.data.types import DataError
from reasonembed.storage import StorageError, resolve

log = logging.getLogger(__name__)

# The table every reader produces (reasonembed.schemas: the canonical sample schema's training columns and dtypes,
# plus source/row, the input file and 0-based row of each sample).
TRAINING_SCHEMA = schemas.TRAINING_SCHEMA
# Bad rows: which file and row, which sample, then the common error columns (reasonembed.schemas).
ERROR_SCHEMA = schemas.error_schema(("source", pa.string()), ("row", pa.int64()), ("sample_id", pa.string()),
                                    ("domain", pa.string()))
# Fields read from input files; anything else (pos_ids, scores, source_doc_id, ...) is ignored for training.
_INPUT_FIELDS = schemas.TRAINING_COLUMNS
_JSON_SCHEMA = pa.schema(schemas.sample_fields(_INPUT_FIELDS))
_ROW = "__row__"  # internal: record index of rows that survived line-by-line JSON parsing
# Not ".json": the authors' formatting script writes indented per-domain *_log.json files next to the data.
_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl"}


class TrainDataConfig(StrictModel):
    """Where training samples come from and how they are grouped into batches (docs/algorithm.md section 2)."""

    paths: list[str] = Field(
        min_length=1,
        description="Files or folders (local or s3://) of parquet (the platform's synthesis output) or JSON lines "
        "(the public ReasonEmbed release, one file per domain). Folders are read non-recursively; names "
        "starting with '_' or '.' are skipped.",
    )
    train_group_size: int | None = Field(
        None, ge=1, description="Passages per query (1 positive + G-1 negatives) for every domain, overriding the "
        "data's per-domain train_group_size. None: use the data (paper: leetcode 2, pony 64, others 16).",
    )
    batch_size: int | None = Field(
        None, ge=1, description="Queries per device for every domain, overriding the data's per-domain batch_size. "
        "A global batch holds batch_size x world_size queries of one domain. None: use the data (paper: "
        "leetcode 64, pony 2, others 8).",
    )
    default_train_group_size: int = Field(16, ge=1, description="Group size of a domain whose rows lack one.")
    default_batch_size: int = Field(8, ge=1, description="Per-device batch size of a domain whose rows lack one.")
    default_prompt: str = Field(
        "", description="Task instruction for rows without a prompt ('' : the query is embedded without one)."
    )
    domains: list[str] | None = Field(None, description="Train only on these domains (None: all).")
    max_samples_per_domain: int | None = Field(
        None, ge=1, description="Keep at most this many samples per domain (seeded choice; for small runs)."
    )
    on_bad_row: Literal["skip", "raise"] = Field(
        "skip", description="Rows without a query, positive or negative: 'skip' sets them aside in the error table "
        "(counted and logged), 'raise' stops with an error naming the file and row.",
    )

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, value: object) -> object:
        # `--data <dir>` on the command line gives one string; a list is the YAML form.
        return [value] if isinstance(value, str) else value


@dataclass
class TrainingData:
    """Valid samples (``TRAINING_SCHEMA``), error rows (``ERROR_SCHEMA``) and what reading them counted."""

    table: pa.Table
    errors: pa.Table
    files: list[str] = field(default_factory=list)
    n_read: int = 0

    @property
    def n_samples(self) -> int:
        return self.table.num_rows

    def has_reasoning(self) -> pa.ChunkedArray:
        """Boolean per row: False where reasoning_query is missing or blank (trained with basic InfoNCE)."""
        rq = self.table.column("reasoning_query")
        return pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(rq)), 0), False)

    def summary(self) -> dict[str, object]:
        reasons = self.errors.column("reason").to_pylist() if self.errors.num_rows else []
        by_reason: dict[str, int] = {}
        for r in reasons:
            key = r.split(":", 1)[0]
            by_reason[key] = by_reason.get(key, 0) + 1
        return {
            "files": len(self.files),
            "rows_read": self.n_read,
            "samples": self.n_samples,
            "error_rows": self.errors.num_rows,
            "errors_by_reason": by_reason,
            "without_reasoning_query": int(self.n_samples - pc.sum(self.has_reasoning()).as_py())
            if self.n_samples else 0,
        }


def list_input_files(paths: list[str], storage: StorageConfig | None = None) -> list[str]:
    """Expand files and folders into a sorted list of parquet/jsonl files; an empty or missing path is an error."""
    out: list[str] = []
    for uri in paths:
        fs, path = resolve(uri, storage)
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise StorageError(f"cannot reach training data {uri}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"training data not found: {uri}")
        if info.type == pafs.FileType.File:
            if _kind(path) is None:
                raise DataError(f"{uri}: unsupported file type (expected {', '.join(sorted(_SUFFIXES))})")
            out.append(uri)
            continue
        found = sorted(
            i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
            if i.type == pafs.FileType.File and _kind(i.path) is not None
            and not posixpath.basename(i.path).startswith(("_", "."))
        )
        if not found:
            raise DataError(f"{uri}: no .parquet or .jsonl files in this folder")
        prefix = uri.rstrip("/")
        out.extend(f"{prefix}/{posixpath.basename(p)}" for p in found)
    return out


def read_training_data(
    cfg: TrainDataConfig, storage: StorageConfig | None = None, seed: int = 42
) -> TrainingData:
    """Read, normalise and validate every input file; see the module docstring for the formats and error policy."""
    files = list_input_files(cfg.paths, storage)
    good: list[pa.Table] = []
    bad: list[pa.Table] = []
    n_read = 0
    for uri in files:
        table, parse_errors = _read_file(uri, storage)
        table = _normalise(table, uri, cfg)
        n_read += table.num_rows + parse_errors.num_rows
        valid, invalid = _validate(table)
        bad.extend(t for t in (parse_errors, invalid) if t.num_rows)
        good.append(valid)
    errors = pa.concat_tables(bad) if bad else ERROR_SCHEMA.empty_table()
    if errors.num_rows and cfg.on_bad_row == "raise":
        first = errors.slice(0, 5).to_pylist()
        lines = "\n".join(f"  {e['source']} row {e['row']} (sample_id {e['sample_id']}): {e['reason']}" for e in first)
        raise DataError(
            f"{errors.num_rows} bad training rows, first ones:\n{lines}\n"
            "fix the data, or set on_bad_row=skip to set them aside in the error table"
        )
    table = pa.concat_tables(good) if good else TRAINING_SCHEMA.empty_table()
    table = _select_domains(table, cfg, seed)
    data = TrainingData(table=table, errors=errors, files=files, n_read=n_read)
    if data.n_samples == 0:
        raise DataError(f"no valid training samples in {cfg.paths} ({errors.num_rows} error rows)")
    s = data.summary()
    if errors.num_rows:
        log.warning("training data: %d bad rows set aside (%s); they are in TrainingData.errors",
                    errors.num_rows, s["errors_by_reason"])
    if s["without_reasoning_query"]:
        log.warning("training data: %d of %d samples have no reasoning_query; they are trained with basic "
                    "InfoNCE (RI := 1)", s["without_reasoning_query"], data.n_samples)
    log.info("training data: %d samples from %d files", data.n_samples, len(files))
    return data


def _kind(path: str) -> str | None:
    return _SUFFIXES.get(posixpath.splitext(path)[1].lower())


def _read_file(uri: str, storage: StorageConfig | None) -> tuple[pa.Table, pa.Table]:
    """(rows with the input fields present, parse-error rows).

    A parquet file must have the columns training requires (``schemas.TRAINING_REQUIRED``): one without them is not
    a sample file (e.g. another stage's output), and is refused by name. JSON lines are checked row by row instead:
    a line without a query, positive or negative is an error row (``_validate``)."""
    fs, path = resolve(uri, storage)
    try:
        if _kind(path) == "parquet":
            table = pq.read_table(path, filesystem=fs)
            schemas.require_columns("train", uri, table.column_names, schemas.TRAINING_REQUIRED)
            return table, ERROR_SCHEMA.empty_table()
        with fs.open_input_stream(path) as fh:
            raw = fh.read()
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    return _parse_jsonl(raw, uri)


def _parse_jsonl(raw: bytes, uri: str) -> tuple[pa.Table, pa.Table]:
    # Fast path: Arrow's JSON reader with an explicit schema (big files, passages stay in Arrow memory). The block
    # must hold the longest line; release lines with ~100 passages run to a few hundred KB.
    opts = pajson.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore")
    try:
        block = max(1 << 20, min(len(raw) + 1, 1 << 30))
        return pajson.read_json(io.BytesIO(raw), read_options=pajson.ReadOptions(block_size=block),
                                parse_options=opts), ERROR_SCHEMA.empty_table()
    except pa.ArrowInvalid:
        pass  # some line is broken or mistyped: find it line by line below
    tables, errors = [], []
    record = -1  # 0-based index among non-blank lines, the "row" of jsonl inputs on both paths
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        record += 1
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            one = pa.Table.from_pylist([{k: obj.get(k) for k in _INPUT_FIELDS}], schema=_JSON_SCHEMA)
            tables.append(one.append_column(_ROW, pa.array([record], pa.int64())))
        except (ValueError, TypeError, pa.ArrowException) as exc:
            errors.append({"source": uri, "row": record, "sample_id": None, "domain": None,
                           "reason": f"bad_json: line {n}: {exc}", "raw_text": line[:500]})
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = _JSON_SCHEMA.empty_table().append_column(_ROW, pa.array([], pa.int64()))
    return table, schemas.error_table(errors, ERROR_SCHEMA)


def _column(table: pa.Table, name: str, n: int) -> pa.ChunkedArray:
    """Column ``name`` cast to the canonical sample dtype (e.g. int64 or int32 group sizes -> int32); nulls when the
    file has no such column."""
    typ = TRAINING_SCHEMA.field(name).type
    if name not in table.column_names:
        return pa.chunked_array([pa.nulls(n, typ)])
    col = table.column(name)
    try:
        return col.cast(typ) if col.type != typ else col
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"column {name!r} has type {col.type}, expected {typ}: {exc}") from exc


def _normalise(table: pa.Table, uri: str, cfg: TrainDataConfig) -> pa.Table:
    """Map a file's table onto TRAINING_SCHEMA: defaults for domain (file stem), prompt and sample_id."""
    n = table.num_rows
    try:
        cols = {name: _column(table, name, n) for name in _INPUT_FIELDS}
    except DataError as exc:
        raise DataError(f"{uri}: {exc}") from exc
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    cols["domain"] = pc.fill_null(cols["domain"], stem)
    cols["prompt"] = pc.fill_null(cols["prompt"], cfg.default_prompt)
    if n and cols["sample_id"].null_count:
        # The public release has no ids: a content hash of (domain, prompt, query) is stable across re-reads.
        ids = [
            sid if sid is not None else _content_id(d, p, q)
            for sid, d, p, q in zip(cols["sample_id"].to_pylist(), cols["domain"].to_pylist(),
                                    cols["prompt"].to_pylist(), cols["query"].to_pylist(), strict=True)
        ]
        cols["sample_id"] = pa.chunked_array([pa.array(ids, pa.string())])
    cols["source"] = pa.chunked_array([pa.array([uri] * n, pa.string())])
    if _ROW in table.column_names:  # set by the line-by-line JSON path, which skips broken lines
        cols["row"] = table.column(_ROW)
    else:
        cols["row"] = pa.chunked_array([pa.array(range(n), pa.int64())])
    return pa.table([cols[f.name] for f in TRAINING_SCHEMA], schema=TRAINING_SCHEMA)


def _content_id(domain: str, prompt: str, query: str | None) -> str:
    blob = "\x1f".join([domain or "", prompt or "", query or ""]).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _validate(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split rows into (valid, error rows); each error names the first failed check."""
    checks = [
        ("no_query", "query is missing or empty", pc.fill_null(
            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table["query"])), 0), True)),
        ("no_positive", "pos is missing or empty (every query needs >= 1 positive)",
         pc.fill_null(pc.equal(pc.list_value_length(table["pos"]), 0), True)),
        ("no_negative", "neg is missing or empty (hard negatives are sampled from it)",
         pc.fill_null(pc.equal(pc.list_value_length(table["neg"]), 0), True)),
        ("bad_group_size", "train_group_size < 1", pc.fill_null(pc.less(table["train_group_size"], 1), False)),
        ("bad_batch_size", "batch_size < 1", pc.fill_null(pc.less(table["batch_size"], 1), False)),
    ]
    reason = pa.nulls(table.num_rows, pa.string())
    any_bad = pa.array([False] * table.num_rows, pa.bool_())
    for key, text, failed in reversed(checks):  # reversed: the first check's reason wins
        reason = pc.if_else(failed, f"{key}: {text}", reason)
        any_bad = pc.or_(any_bad, failed)
    if not pc.any(any_bad).as_py():
        return table, ERROR_SCHEMA.empty_table()
    bad = table.filter(any_bad)
    blank = pa.array([""] * bad.num_rows, pa.string())
    errors = pa.table({
        "source": bad["source"], "row": bad["row"], "sample_id": bad["sample_id"], "domain": bad["domain"],
        "reason": pc.filter(reason, any_bad), "detail": blank, "raw_text": blank,
    }, schema=ERROR_SCHEMA)
    return table.filter(pc.invert(any_bad)), errors


def _select_domains(table: pa.Table, cfg: TrainDataConfig, seed: int) -> pa.Table:
    if cfg.domains is not None:
        present = set(table["domain"].to_pylist())
        missing = sorted(set(cfg.domains) - present)
        if missing:
            raise DataError(f"domains {missing} not in the training data (present: {sorted(present)})")
        table = table.filter(pc.is_in(table["domain"], pa.array(cfg.domains, pa.string())))
    if cfg.max_samples_per_domain is None:
        return table
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    domains = np.asarray(table["domain"].to_pylist(), dtype=object)
    for d in sorted(set(domains.tolist())):
        idx = np.flatnonzero(domains == d)
        if len(idx) > cfg.max_samples_per_domain:
            idx = np.sort(rng.choice(idx, cfg.max_samples_per_domain, replace=False))
        keep.extend(idx.tolist())
    return table.take(pa.array(sorted(keep), pa.int64()))
