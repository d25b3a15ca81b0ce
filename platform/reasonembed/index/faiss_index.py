"""FAISS indexes over platform embeddings: build (flat / IVF / HNSW, sharded), save to local or S3, load, search.

Scores are inner products of L2-normalised vectors (= cosine). ``IndexFlatIP`` is exact; IVF and HNSW trade recall
for speed on large corpora. A corpus larger than ``shard_size`` is split into shards searched independently and
merged by score: exact for flat shards, and it keeps each shard's memory bounded.

An index folder holds ``index.json`` (what produced it: model, pooling, instruction, dimension, corpus manifest),
``ids.parquet`` (row -> doc_id), ``shard-<k>.faiss`` and, when the encode job stores texts, ``texts.parquet``
(doc_id, text). A query encoder that does not match the recorded encoder (``Embedder.describe()``: model, pooling,
length, normalisation, EOS handling, query format) or dimension is refused (``IndexMismatchError``), because its
scores would be meaningless.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa

from reasonembed.config.base import StorageConfig
from reasonembed.storage import Location

IndexKind = Literal["flat", "ivf", "hnsw"]
META = "index.json"
IDS = "ids.parquet"
TEXTS = "texts.parquet"
# Fields of Embedder.describe() that change the vectors a query gets: a query encoder must match the index on each
# (query_instruction is not among them: a server may use another instruction per task, by design).
ENCODER_KEYS = ("model_name", "pooling", "max_length", "normalize", "append_eos", "query_format")


class IndexMismatchError(ValueError):
    """The index was built with another encoder (model, pooling, EOS, query format...) or dimension than the query
    encoder."""


@dataclass
class IndexSpec:
    """How to build an index (mirrors the ``index`` section of the encode config)."""

    kind: IndexKind = "flat"
    shard_size: int = 5_000_000
    ivf_nlist: int | None = None  # None: 4 * sqrt(n)
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 128


def _empty_index(d: int, n: int, spec: IndexSpec) -> faiss.Index:
    """The (untrained) index of one shard of ``n`` vectors."""
    if spec.kind == "flat" or n < 1024:  # IVF needs enough points to train its centroids
        return faiss.IndexFlatIP(d)
    if spec.kind == "ivf":
        nlist = spec.ivf_nlist or max(1, int(4 * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = spec.ivf_nprobe
        return index
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = spec.hnsw_ef_search
        return index
    raise ValueError(f"unknown index kind {spec.kind!r}")


def _build_one(x: np.ndarray, spec: IndexSpec) -> faiss.Index:
    index = _empty_index(x.shape[1], x.shape[0], spec)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


# IVF centroids are trained on at most this many vectors per list (FAISS warns below 39 and gains little past a few
# hundred): a 1M-vector shard with 4,000 lists trains on 256k vectors, a 20k one on all of them.
TRAIN_PER_LIST = 64

Batches = Callable[[], Iterable[tuple[Sequence[str], np.ndarray]]]


def _shard_slices(batches: Batches, shard_size: int) -> Iterator[tuple[int, int, Sequence[str], np.ndarray]]:
    """(shard, first row within the shard, ids, vectors) pieces of a stream of batches, cut at shard boundaries."""
    row = 0
    for ids, x in batches():
        x = np.ascontiguousarray(x, dtype=np.float32)
        i = 0
        while i < len(ids):
            k, off = divmod(row, shard_size)
            j = i + min(len(ids) - i, shard_size - off)
            yield k, off, ids[i:j], x[i:j]
            row += j - i
            i = j


def _train_samples(batches: Batches, sizes: list[int], spec: IndexSpec, d: int) -> dict[int, np.ndarray]:
    """A strided training sample of each shard that needs one (IVF): every ``step``-th row, at most
    ``TRAIN_PER_LIST`` per list, so the driver never holds more than the sample."""
    need = {k: _empty_index(d, m, spec) for k, m in enumerate(sizes)}
    steps = {k: -(-sizes[k] // (TRAIN_PER_LIST * idx.nlist)) for k, idx in need.items() if not idx.is_trained}
    if not steps:
        return {}
    parts: dict[int, list[np.ndarray]] = {k: [] for k in steps}
    for k, off, _, x in _shard_slices(batches, spec.shard_size):
        if k in steps:
            first = (-off) % steps[k]  # rows off+first, off+first+step, ... are multiples of step within the shard
            parts[k].append(x[first::steps[k]])
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass
class SearchIndex:
    """Sharded FAISS index with doc ids and provenance metadata."""

    shards: list[faiss.Index]
    doc_ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    offsets: list[int] = field(default_factory=list)  # first row of each shard

    @property
    def dim(self) -> int:
        return self.shards[0].d

    @property
    def ntotal(self) -> int:
        return len(self.doc_ids)

    @classmethod
    def build(
        cls, embeddings: np.ndarray, doc_ids: Sequence[str], spec: IndexSpec | None = None,
        meta: dict[str, Any] | None = None,
    ) -> SearchIndex:
        spec = spec or IndexSpec()
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(doc_ids):
            raise ValueError(f"embeddings {x.shape} do not match {len(doc_ids)} doc ids")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("duplicate doc ids in index input")
        shards, offsets = [], []
        for start in range(0, max(1, x.shape[0]), spec.shard_size):
            offsets.append(start)
            shards.append(_build_one(x[start:start + spec.shard_size], spec))
        info = {"kind": spec.kind, "dim": int(x.shape[1]), "ntotal": int(x.shape[0]), "metric": "inner_product",
                "shard_size": spec.shard_size, "shards": len(shards), **(meta or {})}
        return cls(shards, list(doc_ids), info, offsets)

    @classmethod
    def build_streamed(
        cls, batches: Batches, n_rows: int, dim: int, spec: IndexSpec | None = None,
        meta: dict[str, Any] | None = None,
    ) -> SearchIndex:
        """Build from a stream of (ids, vectors) batches instead of one array: the driver holds the index, the
        ids and one batch (plus an IVF training sample), never a second copy of all vectors.

        ``batches()`` is called once more for IVF (a first pass collects each shard's strided training sample, at
        most ``TRAIN_PER_LIST`` vectors per list; a shard no larger than that trains on all its vectors, as
        :meth:`build` does). The index itself must fit in memory; a corpus larger than one machine is cut into
        shards of ``spec.shard_size`` (docs/scale.md has the arithmetic)."""
        spec = spec or IndexSpec()
        sizes = [min(spec.shard_size, n_rows - s) for s in range(0, max(1, n_rows), spec.shard_size)]
        samples = _train_samples(batches, sizes, spec, dim)
        shards = [_empty_index(dim, m, spec) for m in sizes]
        for k, sample in samples.items():
            shards[k].train(sample)
        samples.clear()
        doc_ids: list[str] = []
        for k, _, ids, x in _shard_slices(batches, spec.shard_size):
            shards[k].add(x)
            doc_ids.extend(str(i) for i in ids)
        if len(doc_ids) != n_rows:
            raise ValueError(f"the batches held {len(doc_ids)} rows, not the {n_rows} announced")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("duplicate doc ids in index input")
        info = {"kind": spec.kind, "dim": dim, "ntotal": n_rows, "metric": "inner_product",
                "shard_size": spec.shard_size, "shards": len(shards), **(meta or {})}
        return cls(shards, doc_ids, info, [k * spec.shard_size for k in range(len(sizes))])

    def check_compatible(self, encoder: dict[str, Any]) -> None:
        """Refuse a query encoder that differs from the index's recorded encoder on any of ``ENCODER_KEYS`` or on the
        dimension. A field the index does not record (an index built before it was recorded) is not compared."""
        problems = []
        if int(encoder.get("dim", self.dim)) != self.dim:
            problems.append(f"dimension {encoder.get('dim')} != index {self.dim}")
        recorded = self.meta.get("encoder") or {}
        for key in ENCODER_KEYS:
            if key in recorded and key in encoder and recorded[key] != encoder[key]:
                problems.append(f"{key} {encoder[key]!r} != index {recorded[key]!r}")
        if problems:
            raise IndexMismatchError("query encoder does not match the index: " + "; ".join(problems))

    def search(
        self, queries: np.ndarray, k: int, excluded: Sequence[Sequence[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-k (doc_id, score) per query, best first; ``excluded[i]`` ids are removed *after* retrieval.

        The BRIGHT protocol retrieves a large top-k (2000) and then drops each query's excluded ids, so
        fewer than k results may remain; no replacement hits are fetched (that would change the protocol).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(f"query dimension {q.shape[-1]} != index dimension {self.dim}")
        k_eff = min(k, self.ntotal)
        all_s, all_i = [], []
        for shard, off in zip(self.shards, self.offsets, strict=True):
            s, i = shard.search(q, min(k_eff, shard.ntotal))
            all_s.append(s)
            all_i.append(np.where(i >= 0, i + off, -1))
        scores = np.concatenate(all_s, axis=1)
        idx = np.concatenate(all_i, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
        out = []
        for r in range(q.shape[0]):
            drop = set(excluded[r]) if excluded is not None else set()
            hits = []
            for c in order[r]:
                j = int(idx[r, c])
                if j < 0:
                    continue
                did = self.doc_ids[j]
                if did not in drop:
                    hits.append((did, float(scores[r, c])))
            out.append(hits)
        return out

    # ---- persistence -------------------------------------------------------------------------------------
    def save(self, uri: str, storage: StorageConfig | None = None) -> None:
        """Write shards, ids and metadata under ``uri`` (local or s3://); metadata last marks it complete."""
        loc = Location(uri, storage)
        loc.makedirs()
        with tempfile.TemporaryDirectory() as tmp:
            for n, shard in enumerate(self.shards):
                local = Path(tmp, f"shard-{n:05d}.faiss")
                faiss.write_index(shard, str(local))
                loc.upload_file(local, local.name)
        loc.write_table(IDS, pa.table({"doc_id": pa.array(self.doc_ids, pa.string())}))
        loc.write_json(META, {**self.meta, "offsets": self.offsets})

    @classmethod
    def load(cls, uri: str, storage: StorageConfig | None = None) -> SearchIndex:
        loc = Location(uri, storage)
        if not loc.exists(META):
            raise FileNotFoundError(f"no FAISS index at {uri} (missing {META}; run `reasonembed encode` first)")
        meta = loc.read_json(META)
        offsets = meta.pop("offsets")
        doc_ids = loc.read_table(IDS).column("doc_id").to_pylist()
        shards = []
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(len(offsets)):
                local = loc.download_file(f"shard-{n:05d}.faiss", Path(tmp, f"shard-{n:05d}.faiss"))
                shards.append(faiss.read_index(str(local)))
        for shard in shards:
            if meta.get("kind") == "ivf" and hasattr(shard, "nprobe"):
                shard.nprobe = int(meta.get("ivf_nprobe", 32))
        return cls(shards, doc_ids, meta, offsets)
