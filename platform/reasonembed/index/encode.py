"""Batch encoding with Ray Data: corpus -> Embedder actor pool -> parquet shards -> FAISS index.

Resume protocol: every document has a stable shard (hash of its id). Shards are encoded in rounds; each finished
shard is committed as one atomic part file (``part-<shard>.parquet``, plus ``errors/part-<shard>.parquet`` for its
bad rows and, with ``index.store_texts``, ``texts/part-<shard>.parquet``, both written first). A re-run skips shards
whose part exists, so a killed job neither re-encodes finished work nor duplicates rows. The manifest and the index
(with ``texts.parquet`` next to it when texts are stored) are written last.

A finished stage is reused, and a partial one resumed, only under the same config hash *and* the same inputs: the
corpus files and the model are fingerprinted (``reasonembed.input_fingerprint``), so a corpus edited in place or a
model retrained into the same folder is refused rather than mixed with stale embeddings (``overwrite`` redoes it).

A row seen twice under one id is settled by ``reasonembed.repeats``: the same text again is a Ray task retry and is
kept once; different texts under one id make every row of that id an error row.
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
import pyarrow.parquet as pq

from reasonembed import progress, schemas
from reasonembed.config.base import StorageConfig
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.encode import EncodeEngineConfig, EncodeJobConfig, IndexConfig
from reasonembed.heap import trim_heap
from reasonembed.index.faiss_index import TEXTS, IndexSpec, SearchIndex
from reasonembed.index.reader import read_parquet
from reasonembed.repeats import CONFLICTING_ID, content_key, split_repeats
from reasonembed.storage import Location, StageDir

log = logging.getLogger(__name__)
# Error rows (reasonembed.schemas' one shape): the id and the document's text (first 500 characters; two rows of one
# conflicting id differ by it), then reason, detail, raw_text.
ERROR_SCHEMA = schemas.error_schema(("doc_id", pa.string()), ("text", pa.string()))
TEXT_SCHEMA = schemas.TEXT_SCHEMA
TEXT_PARTS = "texts"  # <stage>/texts/part-<shard>.parquet: the stored texts of each committed shard


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [N, D] -> Arrow fixed_size_list<float32>[D]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


part_schema = schemas.encoded_part_schema


class EmbedActor:
    """One model replica in the Ray Data actor pool. Each call gets a window of rows, sorts them by token length
    and runs token-budget batches (``Embedder.encode_ids``), so padding stays small even in a stream.

    Output: every input column except ``text`` (the shard, the content key, the kept text pass through, as with
    the Serve backend's ``ServeEmbedder``), plus ``embedding``, ``n_tokens`` and ``truncated``. With ``trim_heap``
    the freed memory of each window goes back to the OS (``reasonembed.heap``): one actor serves the whole job, and
    without it its memory grows with the rows it has seen before levelling off."""

    def __init__(self, embedder_cfg: EmbedderConfig, trim_heap: bool = True):
        from reasonembed.models.embedder import Embedder

        self.embedder = Embedder(embedder_cfg)
        self.trim_heap = trim_heap

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        ids, flags = self.embedder.token_ids_with_flags(texts)
        res = self.embedder.encode_ids(ids)
        out = {k: v for k, v in batch.items() if k != "text"}
        out.update(embedding=res.embeddings, n_tokens=np.array([len(x) for x in ids], dtype=np.int32),
                   truncated=np.array(flags, dtype=bool))
        if self.trim_heap:
            trim_heap()
        return out

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


def _settle_repeats(rows: dict[str, list], errors: list[dict]) -> tuple[list[int], list[dict]]:
    """(indices of embedded rows to keep, error rows) of one shard, by the rule of ``reasonembed.repeats``.

    Embedded rows and input-error rows are settled together, so an id given once with a good text and once with an
    empty one is a conflict too. Candidates are ordered by (id, embedding bytes) first, so which copy of a retried
    row is kept does not depend on the order the rows arrived in.
    """
    n = len(rows["doc_id"])
    ids = [str(d) for d in rows["doc_id"]] + [e["doc_id"] for e in errors]
    keys = [str(k) for k in rows["content_key"]] + [e["content_key"] for e in errors]
    order = sorted(range(len(ids)), key=lambda i: (ids[i], rows["embedding"][i].tobytes() if i < n else b""))
    keep, repeats, conflicts = split_repeats([ids[i] for i in order], [keys[i] for i in order])
    if repeats:
        log.info("dropped %d repeated rows (same id and text: task retries or verbatim copies)", len(repeats))
    kept_rows = sorted((order[j] for j in keep if order[j] < n), key=lambda i: ids[i])
    out = [{k: errors[order[j] - n][k] for k in ("doc_id", "reason", "text")} for j in keep if order[j] >= n]
    for j in conflicts:
        i = order[j]
        text = str(rows["doc_text"][i]) if i < n else errors[i - n]["text"]
        out.append({"doc_id": ids[i], "reason": CONFLICTING_ID, "text": text[:500]})
    out.sort(key=lambda e: (e["doc_id"], e["reason"], e["text"]))
    return kept_rows, out


def _commit_shard(stage: StageDir, shard: int, rows: dict[str, list], errors: list[dict], width: int,
                  store_texts: bool = False) -> None:
    """Write one shard: its error table (always, even empty, so a stale error file of an interrupted attempt goes),
    its texts when stored, and its part file last, whose presence marks the shard done. ``width`` is the embedding
    width used only when no row of the shard was embedded (the rows' own width wins otherwise)."""
    keep, error_rows = _settle_repeats(rows, errors)
    stage.write_errors(schemas.error_table(error_rows, ERROR_SCHEMA), shard)
    ids = pa.array([str(rows["doc_id"][i]) for i in keep], pa.string())
    if store_texts:
        texts = pa.array([str(rows["doc_text"][i]) for i in keep], pa.string())
        stage.write_table(f"{TEXT_PARTS}/{stage.part_name(shard)}",
                          pa.Table.from_arrays([ids, texts], schema=TEXT_SCHEMA))
    emb = np.stack([rows["embedding"][i] for i in keep]) if keep else np.zeros((0, width), np.float32)
    table = pa.Table.from_arrays(
        [ids, embedding_array(emb), pa.array([rows["n_tokens"][i] for i in keep], pa.int32()),
         pa.array([rows["truncated"][i] for i in keep], pa.bool_())],
        schema=part_schema(emb.shape[1]),
    )
    stage.write_part(table, shard)  # last: its presence marks the shard done


def _model_width(stage: StageDir, embedder_cfg: EmbedderConfig) -> int:
    """Embedding width for a part with no embedded row: the width of the parts already written, else the model's
    hidden size (read from its config, no weights loaded; ``Embedder.dim`` is that same number)."""
    for name in stage.parts():
        return pq.read_schema(stage._p(name), filesystem=stage.fs).field("embedding").type.list_size
    from transformers import AutoConfig

    from reasonembed.models.registry import resolve_model

    return int(AutoConfig.from_pretrained(str(resolve_model(embedder_cfg.model).path)).hidden_size)


def _embed(good, embedder_cfg: EmbedderConfig, engine: EncodeEngineConfig):
    """The embedded dataset of ``good`` rows through the configured engine (actor pool or Serve replicas)."""
    import ray

    if engine.backend == "serve":
        from reasonembed.serving.batch_engine import serve_encode  # optional: shares Serve replicas

        return serve_encode(good, engine.serve_app, engine.window_rows)
    return good.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"embedder_cfg": _actor_cfg(embedder_cfg, engine), "trim_heap": engine.trim_heap},
        compute=ray.data.ActorPoolStrategy(size=engine.actors),
        batch_size=engine.window_rows,
        batch_format="numpy",
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor or None,
        accelerator_type=engine.accelerator_type,
        resources=engine.resources or None,
    )


def _rows_to_embed(batch: dict[str, np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of pending shards that have no input error, each with a ``content_key`` (its text) that tells a Ray
    retry of a row (same key) from another row under the same id (a conflict), and its text under ``doc_text``,
    which both engines pass through (stored texts and conflict rows need it after the model consumed ``text``)."""
    schemas.require_columns("encode", "corpus rows", batch.keys(), schemas.CORPUS_COLUMNS)
    mask = np.isin(batch["shard"], keys) & (batch["error"] == "")
    out = {k: v[mask] for k, v in batch.items()}
    out["content_key"] = np.array([content_key(t, e) for t, e in zip(out["text"], out["error"], strict=True)],
                                  dtype=object)
    out["doc_text"] = np.array([str(t) for t in out["text"]], dtype=object)
    return out


def _add_error_rows(out: dict[int, list[dict]], rows) -> int:
    """Append input-error rows (dicts with doc_id, text, error, shard) to ``out[shard]``; returns how many."""
    n = 0
    for row in rows:
        out[int(row["shard"])].append({"doc_id": row["doc_id"], "reason": row["error"], "text": str(row["text"])[:500],
                                       "content_key": content_key(row["text"], row["error"])})
        n += 1
    return n


STAGED = "_input"  # <stage>/_input/{rows,errors}-<b>/<hash>.parquet: round b's rows to embed and its input errors
STAGED_DONE = "_input/_complete"
# Rows one staging call splits into its rounds' files: a fixed batch, not whatever block size the read gave (from
# 5,000 rows to 128 MiB), so each file holds about STAGE_BATCH_ROWS / rounds rows and the staging worker one batch.
STAGE_BATCH_ROWS = 50_000
STAGED_LAYOUT = 2  # 1 (before): one folder a round holding error rows too; a staging of another layout is redone


def _write_buckets(batch: pa.Table, fs, base: str, shards_per_round: int, keys: np.ndarray) -> pa.Table:
    """Write one block's rows of pending shards into their rounds' folders (round = shard // shards_per_round):
    rows to embed under ``rows-<b>``, input-error rows under ``errors-<b>``. A file is named by a hash of its ids,
    so a retried task rewrites the same file instead of adding a copy."""
    shard = batch.column("shard").to_numpy()
    pending = np.isin(shard, keys)
    bad = np.array([e != "" for e in batch.column("error").to_pylist()], dtype=bool)
    rounds = shard // shards_per_round
    for b in np.unique(rounds[pending]):
        for kind, mask in (("rows", pending & (rounds == b) & ~bad), ("errors", pending & (rounds == b) & bad)):
            if not mask.any():
                continue
            rows = batch.filter(pa.array(mask))
            name = hashlib.blake2b("\0".join(rows.column("doc_id").to_pylist()).encode(), digest_size=12).hexdigest()
            fs.create_dir(f"{base}/{kind}-{int(b):05d}", recursive=True)
            pq.write_table(rows, f"{base}/{kind}-{int(b):05d}/{name}.parquet", filesystem=fs)
    return pa.table({"rows": [int(pending.sum())]})


@dataclass
class _Input:
    """The encode job's input: ``rows(rounds)`` is every pending row to embed of those rounds as one dataset whose
    rows come round after round (None when there is none), and ``errors(b)`` the input-error rows of round ``b``
    (shard -> rows)."""

    rows: object  # Callable[[list[int]], Dataset | None]
    errors: object  # Callable[[int], dict[int, list[dict]]]


def _staged_input(ds, stage: StageDir, pending: list[int], shards_per_round: int) -> _Input:
    """With one round, the corpus dataset itself (read twice: its error rows, then its rows to embed). With several,
    the corpus is read, parsed and hashed once and its rows written grouped by round under ``<stage>/_input``; the
    rows to embed of a group of rounds are then read back as one dataset in round order, so one actor pool (one
    model load per replica) serves the group while the driver holds one round's embeddings. Re-reading the corpus
    every round made the job quadratic in its size (1M documents are 32 rounds). A resumed run reuses a complete
    staging (the stage's config and inputs are the same, ``StageDir.begin`` checks that) and redoes an incomplete
    one."""
    keys = np.array(sorted(pending))
    if len({s // shards_per_round for s in pending}) <= 1:
        errors: dict[int, list[dict]] = defaultdict(list)
        _add_error_rows(errors, ds.filter(lambda row: row["error"] != "" and row["shard"] in keys).iter_rows())
        rows = ds.map_batches(_rows_to_embed, fn_kwargs={"keys": keys}, batch_format="numpy")
        return _Input(lambda rounds: rows, lambda b: errors)
    if not stage.exists(STAGED_DONE) or stage.read_json(STAGED_DONE).get("layout") != STAGED_LAYOUT:
        stage.delete(STAGED)
        written = ds.map_batches(_write_buckets, batch_format="pyarrow", batch_size=STAGE_BATCH_ROWS,
                                 fn_kwargs={"fs": stage.fs, "base": stage._p(STAGED),
                                            "shards_per_round": shards_per_round, "keys": keys})
        log.info("staged %d rows of %d pending shards by round", written.sum("rows") or 0, len(keys))
        stage.write_json(STAGED_DONE, {"shards": len(keys), "layout": STAGED_LAYOUT})

    def errors_of(b: int) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = defaultdict(list)
        for n in stage.list(f"{STAGED}/errors-{b:05d}", ".parquet"):
            table = pq.read_table(stage._p(f"{STAGED}/errors-{b:05d}/{n}"), filesystem=stage.fs,
                                  columns=["doc_id", "text", "error", "shard"])
            _add_error_rows(out, table.to_pylist())
        return out

    def rows_of(rounds: list[int]):
        files = [stage._p(f"{STAGED}/rows-{b:05d}/{n}") for b in rounds
                 for n in stage.list(f"{STAGED}/rows-{b:05d}", ".parquet")]
        if not files:
            return None
        rows = read_parquet(files, filesystem=stage.fs).map_batches(
            _rows_to_embed, fn_kwargs={"keys": keys}, batch_format="numpy")
        # Rows must leave the pipeline in file order (round after round) for the driver to know a round is
        # complete when the next one starts. The dataset's context is its own copy (read_parquet copies it).
        rows.context.execution_options.preserve_order = True
        return rows
    return _Input(rows_of, errors_of)


_ROW_COLUMNS = ("doc_id", "embedding", "n_tokens", "truncated", "content_key", "doc_text")


class _RoundCommitter:
    """Collects the embedded rows of the round being streamed and commits rounds in order: a round is complete
    once a row of a later round arrives (the input is ordered by round), or at the end of the stream. A round with
    no row to embed (all its rows were input errors) is committed when a later round starts, like any other."""

    def __init__(self, stage: StageDir, rounds: dict[int, set[int]], inp: _Input, embedder_cfg: EmbedderConfig,
                 store_texts: bool, bar):
        self.stage, self.rounds, self.inp, self.bar = stage, rounds, inp, bar
        self.embedder_cfg, self.store_texts = embedder_cfg, store_texts
        self.order = sorted(rounds)
        self.next = 0  # index in ``order`` of the first round not committed yet
        self.current: int | None = None
        self.rows: dict[int, dict[str, list]] = {}
        self.width = 0  # learnt from the first embedded row; only needed for a part with none

    def add(self, batch: dict[str, np.ndarray], shards_per_round: int) -> None:
        rnd = batch["shard"] // shards_per_round
        for b in sorted({int(x) for x in rnd}):
            self._start(b)
            for s in {int(x) for x in batch["shard"][rnd == b]}:
                idx = np.flatnonzero(batch["shard"] == s)
                acc = self.rows[s]
                for k in _ROW_COLUMNS:  # one array slice per batch, not one Python object per row and column
                    acc[k].append(batch[k][idx])
        if not self.width and len(batch["doc_id"]):
            self.width = int(batch["embedding"].shape[1])
        self.bar.update(len(batch["doc_id"]))

    def _start(self, b: int) -> None:
        """Make ``b`` the round being collected, committing every earlier one."""
        if b == self.current:
            return
        if self.next >= len(self.order) or b < self.order[self.next]:
            raise RuntimeError(f"encode: rows of round {b} arrived after it was committed; the engine did not keep "
                               "the input order (nothing was lost: re-run to redo the uncommitted shards)")
        while self.order[self.next] < b:
            self._commit(self.order[self.next])
        self.current = b
        self.rows = {s: defaultdict(list) for s in self.rounds[b]}

    def finish(self, last: int | None = None) -> None:
        """Commit every round up to ``last`` (None: all): the stream that carried them has ended."""
        while self.next < len(self.order) and (last is None or self.order[self.next] <= last):
            self._commit(self.order[self.next])

    def _commit(self, b: int) -> None:
        rows = self.rows if b == self.current else {}
        errors = self.inp.errors(b)
        self.bar.update(sum(len(v) for v in errors.values()))  # error rows are done too (they go to errors/)
        for s in sorted(self.rounds[b]):
            chunks = rows.get(s, {})
            acc = {k: np.concatenate(chunks[k]) if chunks.get(k) else np.zeros(0) for k in _ROW_COLUMNS}
            if not len(acc["doc_id"]) and not self.width:
                self.width = _model_width(self.stage, self.embedder_cfg)
            _commit_shard(self.stage, s, acc, errors.get(s, []), self.width, self.store_texts)
        self.next += 1
        self.rows = {} if b == self.current else self.rows
        trim_heap()  # the round's rows are freed: give their pages back, so the driver stays at one round's size
        log.info("committed round %d/%d (%d shards)", self.next, len(self.order), len(self.rounds[b]))
        self.bar.set_postfix(f"round {min(self.next + 1, len(self.order))}/{len(self.order)}")


def encode_dataset(
    build_ds, n_rows: int, embedder_cfg: EmbedderConfig, engine: EncodeEngineConfig, stage: StageDir,
    store_texts: bool = False,
) -> tuple[int, float]:
    """Encode every pending shard of a normalised dataset (doc_id, text, error, shard) into ``stage``.

    A round is the pending shards among ``shards_per_round`` consecutive shard numbers. Each group of
    ``engine.rounds_per_pool`` rounds streams through one engine (one actor pool, or the Serve backend's client
    pool) in round order; the driver holds one round's rows and commits the round's shards when the next round's
    rows begin. The parts' embedding width is the width of the embedded rows themselves (no model probe in the
    driver). Returns (shards already done before this run, seconds spent encoding).
    """
    n_shards = max(1, math.ceil(n_rows / engine.rows_per_shard))
    done = {int(s) for s in stage.done_shards()}
    pending = [s for s in range(n_shards) if s not in done]
    t0 = time.time()
    if not pending:
        stage.delete(STAGED)
        return len(done), 0.0
    inp = _staged_input(build_ds(n_shards), stage, pending, engine.shards_per_round)
    rounds: dict[int, set[int]] = defaultdict(set)
    for s in pending:
        rounds[s // engine.shards_per_round].add(s)
    # Rows of the pending shards: exact on a fresh run; on a resume, estimated from the shard count (a document's
    # shard is a hash of its id, so shards hold about the same number of rows) and corrected at the end.
    total = n_rows if not done else round(n_rows * len(pending) / n_shards)
    log.info("encoding %d shards in %d rounds", len(pending), len(rounds))
    with progress.step(stage.stage, total=total, unit="rows") as bar:
        committer = _RoundCommitter(stage, rounds, inp, embedder_cfg, store_texts, bar)
        order = sorted(rounds)
        step = engine.rounds_per_pool or len(order)
        for i in range(0, len(order), step):
            group = order[i:i + step]
            rows = inp.rows(group)
            if rows is not None:
                for batch in _embed(rows, embedder_cfg, engine).iter_batches(batch_format="numpy", batch_size=None):
                    committer.add(batch, engine.shards_per_round)
            committer.finish(group[-1])
        committer.finish()
        bar.set_total(bar.n)  # exact now (estimated on a resume)
    stage.delete(STAGED)  # every shard is committed: the staged rows are spent
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


def _part_batches(stage: StageDir, names: list[str]):
    """(doc ids, float32 [n, D]) of each part in turn, in shard order (the order ``load_embeddings`` gives)."""
    for name in names:
        table = pq.read_table(stage._p(name), columns=["doc_id", "embedding"], filesystem=stage.fs)
        emb = table.column("embedding").combine_chunks()
        x = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
        yield table.column("doc_id").to_pylist(), x.astype(np.float32, copy=False)


def build_index(stage: StageDir, index_cfg: IndexConfig, meta: dict, storage: StorageConfig | None) -> str:
    """Build and save the FAISS index of an encode stage under ``<stage>/index``; returns its URI.

    With ``index_cfg.store_texts`` the index folder also gets ``texts.parquet`` (doc_id, text) of every indexed
    document, which ``serving.search`` reads to return texts with hits; it is written before ``index.json``, whose
    presence marks the index complete."""
    names = stage.parts()
    n_rows = sum(pq.read_metadata(stage._p(n), filesystem=stage.fs).num_rows for n in names)
    if not n_rows:
        raise ValueError(f"no embeddings in {stage.uri}: every row was an error (see {stage.child('errors')})")
    spec = IndexSpec(kind=index_cfg.kind, shard_size=index_cfg.shard_size, ivf_nlist=index_cfg.ivf_nlist,
                     ivf_nprobe=index_cfg.ivf_nprobe, hnsw_m=index_cfg.hnsw_m, hnsw_ef_search=index_cfg.hnsw_ef_search)
    # Streamed one part at a time: the driver holds the index (which is all the vectors: flat, IVF-Flat and HNSW
    # keep them uncompressed) and one part, not also the whole embedding table and its copies.
    index = SearchIndex.build_streamed(lambda: _part_batches(stage, names), n_rows, _model_width(stage, None),
                                       spec, meta={**meta, "ivf_nprobe": index_cfg.ivf_nprobe})
    ids = index.doc_ids
    uri = stage.child("index")
    folder = Location(uri, storage)
    if index_cfg.store_texts:
        folder.write_table(TEXTS, stored_texts(stage, ids))
    else:
        folder.delete(TEXTS)  # never serve texts of an earlier build
    index.save(uri, storage)
    return uri


def stored_texts(stage: StageDir, ids: list[str]) -> pa.Table:
    """The (doc_id, text) table of an encode stage's ``texts/`` parts; it must cover exactly the indexed ``ids``."""
    names = stage.list(TEXT_PARTS, ".parquet")
    tables = [stage.read_table(f"{TEXT_PARTS}/{n}") for n in names]
    table = pa.concat_tables(tables).cast(TEXT_SCHEMA) if tables else TEXT_SCHEMA.empty_table()
    have = table.column("doc_id").to_pylist()
    if len(have) != len(ids) or set(have) != set(ids):
        raise ValueError(f"{stage.uri}: stored texts cover {len(set(have) & set(ids))} of {len(ids)} indexed "
                         f"documents; re-run with overwrite=true to redo the stage")
    return table


def stage_hash(cfg: EncodeJobConfig) -> str:
    """What determines the stage's rows: data, model, and the sharding (not actors, devices or budgets)."""
    emb = cfg.embedder.model_dump(exclude={"device", "num_threads", "token_budget", "max_batch_size", "dtype"})
    blob = json.dumps({"data": cfg.data.model_dump(), "embedder": emb, "rows_per_shard": cfg.engine.rows_per_shard,
                       "index": cfg.index.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_inputs(cfg: EncodeJobConfig, from_files: bool, inputs: dict[str, str] | None = None) -> dict[str, str]:
    """Fingerprints of what the stage reads: the corpus files (when read from ``data.path``), the embedder model,
    and whatever the caller names in ``inputs`` (e.g. the upstream stage of an in-memory corpus). Raises
    FileNotFoundError for a missing corpus, so bad input is refused before any work starts."""
    from pathlib import Path

    from reasonembed.index.reader import corpus_files
    from reasonembed.input_fingerprint import files_fingerprint, model_input
    from reasonembed.storage import is_s3

    out = dict(inputs or {})
    if from_files:
        files = corpus_files(cfg.data, cfg.storage)[0]
        # Local files by absolute path, so the same corpus run from another directory is the same input.
        out.update(files_fingerprint([f if is_s3(f) else str(Path(f).resolve()) for f in files], cfg.storage))
    out.update(model_input(cfg.embedder.model))
    return out


def _stage_stats(stage: StageDir) -> dict:
    """Row, token and error counts of a stage's committed parts and error tables."""
    stats = stage.read_parts(columns=["n_tokens", "truncated"])
    errors = stage.read_errors()
    by_reason: dict[str, int] = defaultdict(int)
    for r in errors.column("reason").to_pylist() if errors.num_rows else []:
        by_reason[r.split(" (")[0]] += 1
    sums = {c: int(pa.compute.sum(stats.column(c)).as_py() or 0) if stats.num_rows else 0
            for c in ("n_tokens", "truncated")}
    return {"rows_out": stats.num_rows, "rows_error": errors.num_rows, "errors_by_reason": dict(by_reason),
            "tokens": sums["n_tokens"], "truncated": sums["truncated"]}


def run(cfg: EncodeJobConfig, dataset_builder=None, n_rows: int | None = None,
        inputs: dict[str, str] | None = None) -> EncodeSummary:
    """Library entry of `reasonembed encode` / jobs/encode.py.

    ``dataset_builder``/``n_rows`` let callers (evaluation, mining) encode an in-memory corpus through the same
    path: ``dataset_builder(n_shards)`` must return a normalised Ray Dataset (doc_id, text, error, shard). Such a
    corpus has no files to fingerprint: callers name what it was made from in ``inputs`` ({name: fingerprint}),
    so that a finished stage is not reused once that changes (default: only the model is fingerprinted).
    """
    from reasonembed.index.reader import read_corpus
    from reasonembed.models.embedder import Embedder
    from reasonembed.models.registry import resolve_model
    from reasonembed.runtime import connect_ray
    from reasonembed.storage import open_run

    t0 = time.time()
    # Check every input before starting anything, so bad input costs seconds and leaves nothing behind.
    resolve_model(cfg.embedder.model)
    stage_in = stage_inputs(cfg, dataset_builder is None, inputs)
    stage = open_run(cfg.out, cfg.run_id, cfg.storage).stage(cfg.stage)
    h = stage_hash(cfg)
    if stage.is_done(h, stage_in, overwrite=cfg.overwrite):
        m = stage.read_manifest()
        log.info("encode stage %s already complete with this config and inputs: skipping", stage.uri)
        return EncodeSummary(stage.uri, m.rows_out, m.rows_error, m.extra.get("tokens", 0), m.extra.get("truncated", 0),
                             0.0, 0.0, m.shards, m.extra.get("index_uri"))
    connect_ray(cfg.ray)
    if dataset_builder is None:
        dataset_builder, n_rows = read_corpus(cfg.data, storage=cfg.storage)
    describe = {}
    if cfg.index.build:  # the index records what a query encoder must match
        describe = Embedder(cfg.embedder.model_copy(update={"device": "cpu"})).describe()
    stage.begin(h, overwrite=cfg.overwrite, inputs=stage_in)
    before, encode_s = encode_dataset(dataset_builder, n_rows, cfg.embedder, cfg.engine, stage,
                                      cfg.index.store_texts)
    st = _stage_stats(stage)
    index_uri = None
    if cfg.index.build:
        index_uri = build_index(stage, cfg.index, {"encoder": describe, "corpus": cfg.data.model_dump(),
                                                   "config_hash": h, "rows": st["rows_out"]}, cfg.storage)
    summary = EncodeSummary(stage.uri, st["rows_out"], st["rows_error"], st["tokens"], st["truncated"],
                            time.time() - t0, encode_s, before, index_uri)
    stage.write_manifest(
        config_hash=h, rows_in=n_rows or 0, rows_out=st["rows_out"], rows_error=st["rows_error"],
        errors_by_reason=st["errors_by_reason"],
        extra={"tokens": st["tokens"], "truncated": st["truncated"], "tokens_per_s": round(summary.tokens_per_s, 1),
               "encode_s": round(encode_s, 2), "index_uri": index_uri, "encoder": describe},
    )
    return summary
