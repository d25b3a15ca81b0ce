"""The platform's data contracts: the columns every writer produces and every reader expects, in one place.

Training samples (docs/algorithm.md section 1, stage 4):

- :data:`SAMPLE_SCHEMA` is the canonical training sample, one dtype per column: what synthesis writes
  (``remixer.format``). It is the superset of every sample layout.
- :data:`RELEASE_COLUMNS` is the public ReasonEmbed release's layout (``hanhainebula/reason-embed-data``): a subset
  of the sample schema's columns, with the same dtypes.
- :data:`TRAINING_COLUMNS` is what training reads (the release columns plus ``sample_id`` and ``domain`` when a file
  has them); :data:`TRAINING_SCHEMA` is the table training holds: those columns with the sample schema's dtypes, plus
  where each row came from. Training casts what it reads to these dtypes (the release's JSON integers arrive as
  int64, synthesis writes int32), so both layouts give one table.

Encoded parts (``index.encode``): :func:`encoded_part_schema`, :data:`TEXT_SCHEMA` and the corpus rows the encoder
reads (:data:`CORPUS_COLUMNS`, produced by ``index.reader``).

Error rows, one shape everywhere: the key columns that name the failed row (each writer's own: a stage's request id,
domain, shard, ...) followed by :data:`ERROR_COLUMNS` (``reason``, ``detail``, ``raw_text``). ``reason`` is what a
manifest's ``errors_by_reason`` counts; :func:`error_schema` builds a writer's schema and :func:`error_table` its
rows.

Required input columns: each stage declares the columns it needs as ``{name: description}`` and checks them on
entry with :func:`require_columns`, which raises :class:`MissingColumnsError` naming the stage, the input and the
missing columns (as Ray Data's LLM stages declare ``get_required_input_keys()`` and refuse rows without them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from reasonembed.data.types import DataError

# -- training samples --------------------------------------------------------------------------------------------
SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("prompt", pa.string()), ("query", pa.string()), ("reasoning_query", pa.string()),
    ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())), ("train_group_size", pa.int32()),
    ("batch_size", pa.int32()), ("pos_ids", pa.list_(pa.string())), ("neg_ids", pa.list_(pa.string())),
    ("pos_scores", pa.list_(pa.int8())), ("neg_scores", pa.list_(pa.int8())), ("query_id", pa.string()),
    ("source_doc_id", pa.string()), ("domain", pa.string()), ("shard", pa.string()), ("n_unscored", pa.int32()),
])
RELEASE_COLUMNS = ("prompt", "query", "reasoning_query", "pos", "neg", "train_group_size", "batch_size")
TRAINING_COLUMNS = ("sample_id", "domain", *RELEASE_COLUMNS)
# What a training input must have; every other training column has a default (file stem, config, content hash).
TRAINING_REQUIRED = {
    "query": "the query text",
    "pos": "list of positive passages (at least one)",
    "neg": "list of hard-negative passages (at least one)",
}


def sample_fields(names: Iterable[str]) -> list[pa.Field]:
    """The sample schema's fields ``names``, in that order (one dtype per column, wherever it is read)."""
    return [SAMPLE_SCHEMA.field(n) for n in names]


# ``source``/``row`` name the input file and 0-based row of each sample, for error messages.
TRAINING_SCHEMA = pa.schema([*sample_fields(TRAINING_COLUMNS), ("source", pa.string()), ("row", pa.int64())])

# -- encoded parts -------------------------------------------------------------------------------------------------
CORPUS_COLUMNS = {
    "doc_id": "document id (unique per corpus)",
    "text": "document text ('' for an error row)",
    "error": "why the record could not be read ('' when fine)",
    "shard": "stable shard of the id (index.reader.stable_shard)",
}
TEXT_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])  # stored texts, what serving.search reads


def encoded_part_schema(dim: int) -> pa.Schema:
    """An encode stage's part: one embedding of width ``dim`` per document, with its token count."""
    return pa.schema([("doc_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      ("n_tokens", pa.int32()), ("truncated", pa.bool_())])


# -- error rows ----------------------------------------------------------------------------------------------------
ERROR_COLUMNS = {
    "reason": "machine-readable cause, counted in the manifest's errors_by_reason",
    "detail": "human-readable explanation ('' when the reason says it all)",
    "raw_text": "the text that could not be used, e.g. a model's unparseable answer ('' when there is none)",
}


def error_schema(*keys: tuple[str, pa.DataType]) -> pa.Schema:
    """The error-row schema of a writer: its key columns, then :data:`ERROR_COLUMNS`."""
    clash = [name for name, _ in keys if name in ERROR_COLUMNS]
    if clash:
        raise ValueError(f"error-row key columns {clash} clash with the common error columns")
    return pa.schema([*keys, *((name, pa.string()) for name in ERROR_COLUMNS)])


def error_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Error rows with ``schema`` (an empty list keeps the schema); a row without ``detail`` or ``raw_text`` gets ''."""
    blank = {name: "" for name in ERROR_COLUMNS if name != "reason"}
    return pa.Table.from_pylist([{**blank, **r} for r in rows], schema=schema)


# -- required input columns ----------------------------------------------------------------------------------------
class MissingColumnsError(DataError):
    """A stage's input lacks columns the stage requires."""


def require_columns(stage: str, source: str, present: Iterable[str], required: Mapping[str, str]) -> None:
    """Raise :class:`MissingColumnsError` unless ``present`` holds every column of ``required`` (name ->
    description); the message names the stage, the input, each missing column with its description, and what the
    input has."""
    have = list(present)
    missing = [c for c in required if c not in set(have)]
    if missing:
        wanted = "; ".join(f"{c!r} ({required[c]})" for c in missing)
        raise MissingColumnsError(f"{stage}: input {source} lacks required columns {wanted}; it has {sorted(have)}")
