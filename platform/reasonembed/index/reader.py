"""Read a corpus as a streaming Ray Dataset of ``doc_id``/``text`` rows, keeping bad rows as errors.

JSON lines are read as text and parsed per batch, so one malformed line becomes an error row (with its line content)
instead of failing the whole read. Each row gets a ``shard`` from a stable hash of its id, so the same document
always lands in the same part file, whatever the read order, and every row of an id meets the others in one shard,
where the encode job settles repeats (``reasonembed.repeats``: a verbatim repeat is kept once, an id given two
different texts becomes error rows).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from reasonembed.config.base import StorageConfig
from reasonembed.config.encode import CorpusSource
from reasonembed.storage import Location, is_s3, resolve


def stable_shard(doc_id: str, n_shards: int) -> int:
    """shard = blake2b-64(doc_id) mod n_shards (stable across processes, unlike Python's hash())."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % max(1, n_shards)


def corpus_files(src: CorpusSource, storage: StorageConfig | None = None) -> tuple[list[str], str]:
    """Resolve a source path to (files, format). A BEIR folder means its corpus.jsonl."""
    if not src.path:
        raise FileNotFoundError("data.path is empty: give a corpus file, folder or s3:// URI (--data)")
    loc = Location(src.path, storage)
    if not loc.exists():
        raise FileNotFoundError(f"corpus not found: {src.path}")
    info = loc.fs.get_file_info(loc.path)
    if info.type.name == "Directory":
        if loc.exists("corpus.jsonl"):
            files = [loc.child("corpus.jsonl")]
        else:
            names = loc.list("", "")
            files = [loc.child(n) for n in names if n.endswith((".jsonl", ".json", ".parquet"))]
        if not files:
            raise FileNotFoundError(f"no corpus.jsonl, .jsonl or .parquet files in {src.path}")
    else:
        files = [src.path]
    fmt = src.format
    if fmt == "auto":
        fmt = "parquet" if files[0].endswith(".parquet") else "jsonl"
    return files, fmt


def _row_text(obj: dict[str, Any], src: CorpusSource) -> tuple[str | None, str | None, str | None]:
    """(doc_id, text, error) of one record."""
    doc_id = obj.get(src.id_field, obj.get("_id"))
    if doc_id is None or str(doc_id) == "":
        return None, None, f"missing id field {src.id_field!r}"
    text = obj.get(src.text_field)
    if not isinstance(text, str):
        return str(doc_id), None, f"non-text {src.text_field!r} ({type(text).__name__})"
    title = obj.get(src.title_field) if src.title_field else None
    # Some releases (e.g. the shared SciFact copy) already put the title at the start of `text`: never add it twice.
    if isinstance(title, str) and title.strip() and not text.startswith(title):
        text = f"{title} {text}"
    if not text.strip():
        return str(doc_id), None, "empty text"
    return str(doc_id), text, None


def _normalise(records: list[dict[str, Any]], src: CorpusSource, n_shards: int) -> dict[str, np.ndarray]:
    ids, texts, errors, shards = [], [], [], []
    for obj in records:
        doc_id, text, err = _row_text(obj, src)
        ids.append(doc_id if doc_id is not None else f"<no-id:{hashlib.sha1(json.dumps(obj, default=str).encode()).hexdigest()[:12]}>")
        texts.append(text or "")
        errors.append(err or "")
        shards.append(stable_shard(ids[-1], n_shards))
    return {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object),
            "error": np.array(errors, dtype=object), "shard": np.array(shards, dtype=np.int64)}


def read_parquet(paths: list[str], **kwargs):
    """``ray.data.read_parquet`` built on Ray's V1 datasource (the caller's ``use_datasource_v2`` is restored after).

    Ray 2.60 routes ``read_parquet`` through DataSourceV2 by default, whose scanner (``pyarrow.dataset`` batches)
    keeps memory in proportion to what a worker has read. Measured here with ``bench/actor_memory.py`` (docs/scale.md,
    "Memory of long-lived workers"): reading the scale bench's 1M corpus, the read workers peaked at 647 MiB
    private after 250k rows and 803 MiB after all of them on V2, 171 and 179 MiB on V1; a map actor fed from a V2
    read kept 1.04 MiB per 1 MiB it returned, 0.002 on V1. Upstream: apache/arrow#39808 (``Dataset.to_batches``
    accumulates memory), ray-project/ray#62745, and ray-project/ray#63674, which turns V2 off by default in later
    Ray. The switch is read when the read is built, so it only needs to be off during this call. Every parquet read
    of a corpus or a staged stream goes through here.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


# Rows parsed into Python objects at a time. Ray Data's map_batches default (None) is a whole block, and a read
# block grows with the corpus up to DataContext.target_max_block_size (128 MiB: 440,000 rows of the scale bench's
# 1M corpus, whose Python objects took the reading worker past 1.2 GB); a fixed batch keeps the parse flat.
NORMALISE_BATCH_ROWS = 4096


def read_corpus(src: CorpusSource, n_shards_hint: int | None = None, storage: StorageConfig | None = None):
    """A Ray Dataset with columns doc_id, text, error ('' when fine) and shard (``schemas.CORPUS_COLUMNS``, what the
    encode stage requires of its input); plus its row count.

    Returns ``(dataset_factory, n_rows)`` where ``dataset_factory(n_shards)`` builds the normalised dataset: the
    shard count depends on the row count, which needs one pass over the data first.
    """
    import ray

    files, fmt = corpus_files(src, storage)
    fs = resolve(files[0], storage)[0] if is_s3(files[0]) else None
    paths = [f[len("s3://"):] if is_s3(f) else f for f in files]
    if fmt == "parquet":
        raw = read_parquet(paths, filesystem=fs)
    else:
        raw = ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True)
    if src.limit:
        raw = raw.limit(src.limit)
    n_rows = raw.count()

    def build(n_shards: int):
        if fmt == "parquet":
            def norm(batch: pa.Table) -> dict[str, np.ndarray]:
                return _normalise(batch.to_pylist(), src, n_shards)
            return raw.map_batches(norm, batch_format="pyarrow", zero_copy_batch=True, batch_size=NORMALISE_BATCH_ROWS)

        def parse(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            records = []
            for line in batch["text"]:
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    obj = {"__bad__": f"malformed JSON line ({exc}): {str(line)[:200]}"}
                records.append(obj)
            out = _normalise([r for r in records], src, n_shards)
            for i, r in enumerate(records):
                if "__bad__" in r:
                    out["error"][i] = r["__bad__"]
            return out
        return raw.map_batches(parse, batch_format="numpy", batch_size=NORMALISE_BATCH_ROWS)

    return build, n_rows
