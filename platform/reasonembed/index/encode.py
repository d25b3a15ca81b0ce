"""Batch encoding with Ray Data: corpus -> Embedder actor pool -> parquet shards -> FAISS index.

Resume protocol: every document has a stable shard (hash of its id). Shards are encoded in rounds; each finished
shard is committed as one atomic part file (``part-<shard>.parquet``, plus ``errors/part-<shard>.parquet`` for its
bad rows, written first). A re-run skips shards whose part exists, so a killed job neither re-encodes finished work
nor duplicates rows. The manifest and the index are written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from reasonembed import progress
from reasonembed.config.base import StorageConfig
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.encode import EncodeEngineConfig, EncodeJobConfig, IndexConfig
from reasonembed.index.faiss_index import IndexSpec, SearchIndex
from reasonembed.storage import StageDir

log = logging.getLogger(__name__)
ERROR_SCHEMA = pa.schema([("doc_id", pa.string()), ("reason", pa.string()), ("text", pa.string())])


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [N, D] -> Arrow fixed_size_list<float32>[D]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      ("n_tokens", pa.int32()), ("truncated", pa.bool_())])


class EmbedActor:
    """One model replica in the Ray Data actor pool. Each call gets a window of rows, sorts them by token length
    and runs token-budget batches (``Embedder.encode_ids``), so padding stays small even in a stream."""

    def __init__(self, embedder_cfg: EmbedderConfig):
        from reasonembed.models.embedder import Embedder

        self.embedder = Embedder(embedder_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        ids, flags = self.embedder.token_ids_with_flags(texts)
        res = self.embedder.encode_ids(ids)
        return {
            "doc_id": batch["doc_id"],
            "shard": batch["shard"],
            "embedding": res.embeddings,
            "n_tokens": np.array([len(x) for x in ids], dtype=np.int32),
            "truncated": np.array(flags, dtype=bool),
        }


@dataclass
class EncodeSummary:
    """What an encode run produced (also printed at the end)."""

    stage: str
    rows: int
    rows_error: int
    tokens: int
    truncated: int
    wall_s: float
    encode_s: float
    shards_done_before: int
    index_uri: str | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.encode_s if self.encode_s > 0 else 0.0

    def line(self) -> str:
        return (f"encode: {self.rows} rows, {self.tokens} tokens, {self.tokens_per_s:,.0f} tokens/s, "
                f"{self.truncated} truncated, {self.rows_error} error rows, {self.wall_s:.1f} s wall"
                + (f", resumed past {self.shards_done_before} shards" if self.shards_done_before else ""))


def _dedupe(rows: dict[str, list]) -> tuple[list[int], list[int]]:
    """Indices to keep and indices that repeat an id (the first occurrence by embedding bytes order is kept,
    so the choice does not depend on the order rows arrived in)."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(rows["doc_id"]):
        by_id[d].append(i)
    keep, dup = [], []
    for idx in by_id.values():
        idx = sorted(idx, key=lambda i: rows["embedding"][i].tobytes())
        keep.append(idx[0])
        dup.extend(idx[1:])
    return sorted(keep, key=lambda i: rows["doc_id"][i]), dup


def _commit_shard(stage: StageDir, shard: int, rows: dict[str, list], errors: list[dict], dim: int) -> None:
    keep, dup = _dedupe(rows) if rows["doc_id"] else ([], [])
    errors = errors + [{"doc_id": rows["doc_id"][i], "reason": "duplicate id", "text": ""} for i in dup]
    errors.sort(key=lambda e: (e["doc_id"], e["reason"]))
    stage.write_errors(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), shard)
    emb = np.stack([rows["embedding"][i] for i in keep]) if keep else np.zeros((0, dim), np.float32)
    table = pa.Table.from_arrays(
        [pa.array([rows["doc_id"][i] for i in keep], pa.string()), embedding_array(emb) if keep else
         pa.array([], pa.list_(pa.float32(), dim)),
         pa.array([rows["n_tokens"][i] for i in keep], pa.int32()),
         pa.array([rows["truncated"][i] for i in keep], pa.bool_())],
        schema=part_schema(dim),
    )
    stage.write_part(table, shard)  # last: its presence marks the shard done


def encode_dataset(
    build_ds, n_rows: int, embedder_cfg: EmbedderConfig, engine: EncodeEngineConfig, stage: StageDir, dim: int
) -> tuple[int, float]:
    """Encode every pending shard of a normalised dataset (doc_id, text, error, shard) into ``stage``.

    Returns (shards already done before this run, seconds spent encoding).
    """
    import ray

    n_shards = max(1, math.ceil(n_rows / engine.rows_per_shard))
    done = {int(s) for s in stage.done_shards()}
    pending = [s for s in range(n_shards) if s not in done]
    ds = build_ds(n_shards)
    t0 = time.time()
    # Rows of the pending shards: exact on a fresh run; on a resume, estimated from the shard count (a document's
    # shard is a hash of its id, so shards hold about the same number of rows) and corrected at the end.
    total = n_rows if not done else round(n_rows * len(pending) / n_shards)
    name = "encode" if stage.stage == "encode" else stage.stage
    rounds = math.ceil(len(pending) / engine.shards_per_round) if pending else 0
    with progress.step(name, total=total, unit="rows") as bar:
        for r in range(0, len(pending), engine.shards_per_round):
            round_shards = set(pending[r:r + engine.shards_per_round])
            log.info("encoding shards %s (%d/%d pending)", sorted(round_shards), len(pending) - r, n_shards)
            bar.set_postfix(f"round {r // engine.shards_per_round + 1}/{rounds}, {len(round_shards)} shards")
            keys = np.array(sorted(round_shards))

            def in_round(batch, keys=keys):
                mask = np.isin(batch["shard"], keys)
                return {k: v[mask] for k, v in batch.items()}

            sub = ds.map_batches(in_round, batch_format="numpy")
            errors: dict[int, list[dict]] = defaultdict(list)
            for row in sub.filter(lambda row: row["error"] != "").iter_rows():
                errors[int(row["shard"])].append({"doc_id": row["doc_id"], "reason": row["error"],
                                                   "text": str(row["text"])[:500]})
            bar.update(sum(len(v) for v in errors.values()))  # error rows are done too (they go to errors/)
            good = sub.filter(lambda row: row["error"] == "")
            if engine.backend == "serve":
                from reasonembed.serving.batch_engine import serve_encode  # optional: shares Serve replicas

                out = serve_encode(good, engine.serve_app, engine.window_rows)
            else:
                out = good.map_batches(
                    EmbedActor,
                    fn_constructor_kwargs={"embedder_cfg": _actor_cfg(embedder_cfg, engine)},
                    compute=ray.data.ActorPoolStrategy(size=engine.actors),
                    batch_size=engine.window_rows,
                    batch_format="numpy",
                    num_cpus=engine.num_cpus_per_actor,
                    num_gpus=engine.num_gpus_per_actor or None,
                    accelerator_type=engine.accelerator_type,
                    resources=engine.resources or None,
                )
            rows: dict[int, dict[str, list]] = {s: defaultdict(list) for s in round_shards}
            for batch in out.iter_batches(batch_format="numpy", batch_size=None):
                for i in range(len(batch["doc_id"])):
                    acc = rows[int(batch["shard"][i])]
                    for k in ("doc_id", "embedding", "n_tokens", "truncated"):
                        acc[k].append(batch[k][i])
                bar.update(len(batch["doc_id"]))
            for s in sorted(round_shards):
                _commit_shard(stage, s, rows[s], errors.get(s, []), dim)
        bar.set_total(bar.n)  # exact now (estimated on a resume)
    return len(done), time.time() - t0


def _actor_cfg(cfg: EmbedderConfig, engine: EncodeEngineConfig) -> EmbedderConfig:
    """Thread count for CPU actors: Ray's CPU reservation is a scheduling token, not a thread limit, so use the
    cores the actors share (the feeding tasks are light)."""
    if cfg.num_threads is None and engine.num_gpus_per_actor == 0:
        threads = engine.threads_per_actor or max(1, (os.cpu_count() or 1) // engine.actors)
        return cfg.model_copy(update={"num_threads": threads})
    return cfg


def load_embeddings(stage: StageDir) -> tuple[list[str], np.ndarray]:
    """All (doc_id, embedding) rows of an encode stage, in shard order."""
    table = stage.read_parts(columns=["doc_id", "embedding"])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    x = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return table.column("doc_id").to_pylist(), x


def build_index(stage: StageDir, index_cfg: IndexConfig, meta: dict, storage: StorageConfig | None) -> str:
    """Build and save the FAISS index of an encode stage under ``<stage>/index``; returns its URI."""
    ids, x = load_embeddings(stage)
    if not ids:
        raise ValueError(f"no embeddings in {stage.uri}: every row was an error (see {stage.child('errors')})")
    spec = IndexSpec(kind=index_cfg.kind, shard_size=index_cfg.shard_size, ivf_nlist=index_cfg.ivf_nlist,
                     ivf_nprobe=index_cfg.ivf_nprobe, hnsw_m=index_cfg.hnsw_m, hnsw_ef_search=index_cfg.hnsw_ef_search)
    index = SearchIndex.build(x, ids, spec, meta={**meta, "ivf_nprobe": index_cfg.ivf_nprobe})
    uri = stage.child("index")
    index.save(uri, storage)
    return uri


def stage_hash(cfg: EncodeJobConfig) -> str:
    """What determines the stage's rows: data, model, and the sharding (not actors, devices or budgets)."""
    emb = cfg.embedder.model_dump(exclude={"device", "num_threads", "token_budget", "max_batch_size", "dtype"})
    blob = json.dumps({"data": cfg.data.model_dump(), "embedder": emb, "rows_per_shard": cfg.engine.rows_per_shard,
                       "index": cfg.index.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: EncodeJobConfig, dataset_builder=None, n_rows: int | None = None) -> EncodeSummary:
    """Library entry of `reasonembed encode` / jobs/encode.py.

    ``dataset_builder``/``n_rows`` let callers (evaluation, mining) encode an in-memory corpus through the same
    path: ``dataset_builder(n_shards)`` must return a normalised Ray Dataset (doc_id, text, error, shard).
    """
    from reasonembed.index.reader import corpus_files, read_corpus
    from reasonembed.models.embedder import Embedder
    from reasonembed.models.registry import resolve_model
    from reasonembed.runtime import connect_ray
    from reasonembed.storage import open_run

    t0 = time.time()
    # Check every input before starting anything, so bad input costs seconds and leaves nothing behind.
    resolve_model(cfg.embedder.model)
    if dataset_builder is None:
        corpus_files(cfg.data, cfg.storage)
    run_dir = open_run(cfg.out, cfg.run_id, cfg.storage)
    stage = run_dir.stage(cfg.stage)
    h = stage_hash(cfg)
    if stage.is_done(h):
        m = stage.read_manifest()
        log.info("encode stage %s already complete with this config: skipping", stage.uri)
        return EncodeSummary(stage.uri, m.rows_out, m.rows_error, m.extra.get("tokens", 0), m.extra.get("truncated", 0),
                             0.0, 0.0, m.shards, m.extra.get("index_uri"))
    connect_ray(cfg.ray)
    if dataset_builder is None:
        dataset_builder, n_rows = read_corpus(cfg.data, storage=cfg.storage)
    probe = Embedder(cfg.embedder.model_copy(update={"device": "cpu"})) if cfg.index.build else None
    describe = probe.describe() if probe else {}
    dim = probe.dim if probe else 0
    del probe
    stage.begin(h, overwrite=cfg.overwrite)
    before, encode_s = encode_dataset(dataset_builder, n_rows, cfg.embedder, cfg.engine, stage, dim)
    stats = stage.read_parts(columns=["n_tokens", "truncated"])
    errors = stage.read_errors()
    tokens = int(pa.compute.sum(stats.column("n_tokens")).as_py() or 0) if stats.num_rows else 0
    truncated = int(pa.compute.sum(stats.column("truncated")).as_py() or 0) if stats.num_rows else 0
    by_reason: dict[str, int] = defaultdict(int)
    for r in errors.column("reason").to_pylist() if errors.num_rows else []:
        by_reason[r.split(" (")[0]] += 1
    index_uri = None
    if cfg.index.build:
        index_uri = build_index(stage, cfg.index, {"encoder": describe, "corpus": cfg.data.model_dump(),
                                                   "config_hash": h, "rows": stats.num_rows}, cfg.storage)
    summary = EncodeSummary(stage.uri, stats.num_rows, errors.num_rows, tokens, truncated, time.time() - t0,
                            encode_s, before, index_uri)
    stage.write_manifest(
        config_hash=h, rows_in=n_rows or 0, rows_out=stats.num_rows, rows_error=errors.num_rows,
        errors_by_reason=dict(by_reason),
        extra={"tokens": tokens, "truncated": truncated, "tokens_per_s": round(summary.tokens_per_s, 1),
               "encode_s": round(encode_s, 2), "index_uri": index_uri, "encoder": describe},
    )
    return summary
