"""Dense and hybrid retrieval for evaluation: encode the corpus with the encode job, search FAISS, drop excluded ids.

Protocol (BRIGHT): retrieve the top ``k`` (2000) by exact inner product, then remove each query's
``excluded_ids``, then rank what remains. Hybrid fusion: s = α·minmax(s_dense) + (1-α)·minmax(s_bm25) per query,
over the union of both candidate lists (a document missing from one list scores 0 on that side).

Query instructions, first match wins per query (``query_instructions``): the query record's own ``instruction``
(``task.queries.instructions[i]`` not None; ``"per-query"``), else the task's instruction when
``use_task_instruction`` is on (``"task"``), else the embedder's configured ``query_instruction``
(``"model-default"``), else none (``"none"``). Queries are encoded in groups of one instruction each, so every query
gets exactly the model's instruction format for its own instruction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from reasonembed.config.encode import EncodeJobConfig
from reasonembed.config.evaluate import EvaluateJobConfig
from reasonembed.data.types import RetrievalTask
from reasonembed.index.faiss_index import IndexMismatchError, IndexSpec, SearchIndex
from reasonembed.models.embedder import Embedder, EncodeResult

log = logging.getLogger(__name__)
Run = dict[str, dict[str, float]]


def corpus_dataset_builder(task: RetrievalTask, ids: Sequence[str] | None = None, texts: Sequence[str] | None = None):
    """(builder, n_rows) over an in-memory corpus, in the normalised form the encode job consumes: the task's whole
    corpus, or only ``ids``/``texts`` when given (the pool protocol encodes just the pooled documents)."""
    import ray

    from reasonembed.index.reader import stable_shard

    ids = list(task.corpus.ids if ids is None else ids)
    texts = list(task.corpus.texts if texts is None else texts)

    def build(n_shards: int):
        table = pa.table({
            "doc_id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "error": pa.array(["" if t and t.strip() else "empty text" for t in texts], pa.string()),
            "shard": pa.array([stable_shard(d, n_shards) for d in ids], pa.int64()),
        })
        return ray.data.from_arrow(table)

    return build, len(ids)


def corpus_index(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder) -> tuple[SearchIndex, dict]:
    """The task corpus's FAISS index: through the Ray Data encode job (cached per run) or in-process."""
    t0 = time.time()
    if cfg.prebuilt_index:
        index = SearchIndex.load(cfg.prebuilt_index, cfg.storage)
        missing = set(task.corpus.ids) - set(index.doc_ids)
        if missing:
            raise IndexMismatchError(
                f"prebuilt index {cfg.prebuilt_index} lacks {len(missing)} of the {len(task.corpus)} documents of "
                f"{task.benchmark}/{task.name} (e.g. {sorted(missing)[:3]}); encode that corpus first"
            )
        return index, {"encode_s": 0.0, "prebuilt_index": cfg.prebuilt_index}
    if cfg.corpus_encoding == "local":
        res = embedder.encode_with_stats(task.corpus.texts)
        spec = IndexSpec(kind=cfg.index.kind, shard_size=cfg.index.shard_size)
        index = SearchIndex.build(res.embeddings, task.corpus.ids, spec, meta={"encoder": embedder.describe()})
        return index, {"encode_s": round(time.time() - t0, 2), "tokens": res.n_tokens, "truncated": res.n_truncated}
    from reasonembed.index import encode

    enc_cfg = EncodeJobConfig(
        run_id=cfg.run_id, out=cfg.out, seed=cfg.seed, ray=cfg.ray, storage=cfg.storage,
        data={"path": f"<task:{task.benchmark}/{task.name}:{task.metadata.get('revision', '')}>"},
        # The embedder's own config: it carries this task's max length (evaluation.pipeline.task_max_length).
        embedder=embedder.cfg.model_copy(update={"query_instruction": None}), engine=cfg.engine, index=cfg.index,
        stage=f"encode/{task.benchmark}/{task.name}",
    )
    builder, n = corpus_dataset_builder(task)
    summary = encode.run(enc_cfg, dataset_builder=builder, n_rows=n)
    index = SearchIndex.load(summary.index_uri, cfg.storage)
    return index, {"encode_s": round(time.time() - t0, 2), "tokens": summary.tokens, "truncated": summary.truncated,
                   "encode_stage": summary.stage}


@dataclass
class QueryInstructions:
    """Which instruction each query is encoded with (module docstring) and where it came from.

    Attributes:
        per_query: the ``instruction`` argument of ``Embedder.format_queries`` for each query (None: the
            embedder's own default, which may itself be none).
        source: ``"per-query"`` when any query has its own, else the fallback's source.
        fallback: the instruction of the queries without their own (None: the embedder's default).
        fallback_source: ``"task"``, ``"model-default"`` or ``"none"``.
        n_own: how many queries carry their own instruction.
    """

    per_query: list[str | None]
    source: str
    fallback: str | None
    fallback_source: str
    n_own: int

    def info(self) -> dict:
        """The report.json fields: the source, the count of own instructions, and the fallback's source when some
        queries used it next to their own ones."""
        out = {"instruction": self.fallback, "instruction_source": self.source,
               "queries_with_own_instruction": self.n_own}
        if 0 < self.n_own < len(self.per_query):
            out["instruction_source_other_queries"] = self.fallback_source
        return out


def query_instructions(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder) -> QueryInstructions:
    """Resolve each query's instruction (module docstring)."""
    own = getattr(task.queries, "instructions", None) or [None] * len(task.queries)
    fallback = task.instruction if cfg.use_task_instruction and task.instruction else None
    if fallback is not None:
        fallback_source = "task"
    else:
        fallback_source = "model-default" if embedder.cfg.query_instruction else "none"
    n_own = sum(1 for i in own if i is not None)
    per_query = [i if i is not None else fallback for i in own]
    return QueryInstructions(per_query, "per-query" if n_own else fallback_source, fallback, fallback_source, n_own)


def encode_queries(embedder: Embedder, texts: Sequence[str], instructions: Sequence[str | None]) -> EncodeResult:
    """Embed queries, each with its own instruction: one encode per distinct instruction, rows in input order."""
    groups: dict[str | None, list[int]] = {}
    for i, instr in enumerate(instructions):
        groups.setdefault(instr, []).append(i)
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    total = EncodeResult(out, 0, 0, 0, 0)
    for instr, rows in groups.items():
        res = embedder.encode_with_stats([texts[i] for i in rows], is_query=True, instruction=instr)
        out[rows] = res.embeddings
        total.n_tokens += res.n_tokens
        total.n_padded_tokens += res.n_padded_tokens
        total.n_truncated += res.n_truncated
        total.n_batches += res.n_batches
    return total


def dense_run(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder, k: int) -> tuple[Run, dict]:
    """Dense retrieval run for every query of ``task`` (excluded ids removed after the top-k search)."""
    index, info = corpus_index(cfg, task, embedder)
    index.check_compatible(embedder.describe())
    instructions = query_instructions(cfg, task, embedder)
    t0 = time.time()
    q = encode_queries(embedder, task.queries.texts, instructions.per_query)
    hits = index.search(q.embeddings, k)
    run = {qid: dict(h) for qid, h in zip(task.queries.ids, hits, strict=True)}
    info.update(query_s=round(time.time() - t0, 2), queries_truncated=q.n_truncated, **instructions.info())
    return run, info


def _minmax(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    v = np.array(list(scores.values()), dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else 1.0
    return {d: (s - lo) / span for d, s in scores.items()}


def fuse(dense: Run, sparse: Run, alpha: float, k: int) -> Run:
    """Hybrid fusion (module docstring), keeping the best ``k`` per query."""
    out: Run = {}
    for qid in set(dense) | set(sparse):
        a, b = _minmax(dense.get(qid, {})), _minmax(sparse.get(qid, {}))
        fused = {d: alpha * a.get(d, 0.0) + (1 - alpha) * b.get(d, 0.0) for d in set(a) | set(b)}
        out[qid] = dict(sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
    return out
