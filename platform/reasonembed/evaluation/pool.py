"""The pool protocol: each query ranks only the documents its qrels list (``evaluate --protocol pool``).

A query's pool is every qrels row of that query, whatever its score (a score-0 row is a judged non-relevant
candidate: a reranking pool or the wrong answers of a multiple-choice item). Documents outside a query's pool are
never scored for it. Dense, BM25 and hybrid retrievers all follow the protocol:

- dense: the union of all pools is embedded once (each document once, however many pools hold it; never the
  whole corpus and never a FAISS index), the queries are embedded with their instructions
  (``retrieve.query_instructions``), and each query is scored against its own pool by exact inner product;
- BM25: the whole corpus's index and statistics, but only pool documents are scored (``BM25Retriever.score_pools``);
- hybrid: the two pool runs fused as in the corpus protocol (``retrieve.fuse``), over the pool.

Excluded ids (BRIGHT) still apply: the pipeline removes them from the pool run as from a corpus run.

A pool document that is not in the corpus cannot be scored. The BEIR-layout loader already drops qrels rows on
unknown doc ids with one counted warning (report.json: ``data.validation.qrels_unknown_docs_dropped``); a task built
another way gets the same here: the document is left out of its pool and counted (``pool_docs_not_in_corpus``).

Depth: ``top_k`` unset ranks each whole pool (``pool_depth`` returns None). The corpus protocol's default depth
(1000, BRIGHT 2000) exists to bound a search over a large corpus; a pool is already the candidate list the data
defines, and cutting it silently would change recall and MAP against the pool's own judgements. A ``top_k`` the user
sets keeps each query's best ``top_k`` pool documents.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from reasonembed.config.evaluate import EvaluateJobConfig
from reasonembed.data.types import RetrievalTask
from reasonembed.evaluation.bm25 import BM25Config, BM25Retriever
from reasonembed.evaluation.retrieve import corpus_dataset_builder, encode_queries, fuse, query_instructions
from reasonembed.models.embedder import Embedder

log = logging.getLogger(__name__)
Run = dict[str, dict[str, float]]
Pools = dict[str, list[str]]


@dataclass
class PoolStats:
    """What the pools hold: (query, doc) rows kept, distinct docs (each embedded once), rows dropped because the doc
    is not in the corpus, and the largest and smallest pool."""

    n_pool_rows: int = 0
    n_pool_docs: int = 0
    n_missing_docs: int = 0
    largest_pool: int = 0
    smallest_pool: int = 0

    def info(self) -> dict:
        """The report.json fields."""
        return {"pool_rows": self.n_pool_rows, "pool_docs": self.n_pool_docs,
                "pool_docs_not_in_corpus": self.n_missing_docs, "largest_pool": self.largest_pool,
                "smallest_pool": self.smallest_pool}


def query_pools(task: RetrievalTask) -> tuple[Pools, PoolStats]:
    """Each query's pool (its qrels rows' doc ids, in qrels order, only those in the corpus) and the counts."""
    in_corpus = set(task.corpus.ids)
    pools: Pools = {}
    missing: list[str] = []
    for qid in task.queries.ids:
        docs = list(task.qrels.get(qid, {}))
        pools[qid] = [d for d in docs if d in in_corpus]
        missing += [d for d in docs if d not in in_corpus]
    sizes = [len(p) for p in pools.values()] or [0]
    stats = PoolStats(n_pool_rows=sum(sizes), n_pool_docs=len({d for p in pools.values() for d in p}),
                      n_missing_docs=len(missing), largest_pool=max(sizes), smallest_pool=min(sizes))
    if missing:
        log.warning("%s/%s: %d pool rows name documents that are not in the corpus and are left out of the pools "
                    "(e.g. %s)", task.benchmark, task.name, len(missing), sorted(set(missing))[:3])
    return pools, stats


def pool_depth(cfg: EvaluateJobConfig) -> int | None:
    """How many pool documents each query keeps: all (None) unless the user set ``top_k`` (module docstring)."""
    return cfg.top_k


def bm25_pool_run(task: RetrievalTask, pools: Mapping[str, Sequence[str]], cfg: BM25Config | None = None) -> Run:
    """BM25 scores of each query's pool documents, with the whole corpus's statistics."""
    retriever = BM25Retriever(cfg).index(task.corpus.ids, task.corpus.texts)
    return retriever.score_pools(task.queries.ids, task.queries.texts, pools)


def pool_embeddings(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder,
                    doc_ids: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """{doc id: embedding} of ``doc_ids`` (each once), in-process or through the Ray Data encode job, as the corpus
    protocol would encode the corpus (``corpus_encoding``); the encode job builds no index here."""
    t0 = time.time()
    if not doc_ids:  # no pooled document is in the corpus: nothing to embed, every query ranks nothing
        return {}, {"encode_s": 0.0, "tokens": 0, "truncated": 0}
    text_of = dict(zip(task.corpus.ids, task.corpus.texts, strict=True))
    texts = [text_of[d] for d in doc_ids]
    if cfg.corpus_encoding == "local":
        res = embedder.encode_with_stats(texts)
        return dict(zip(doc_ids, res.embeddings, strict=True)), {
            "encode_s": round(time.time() - t0, 2), "tokens": res.n_tokens, "truncated": res.n_truncated}
    from reasonembed.config.encode import EncodeJobConfig
    from reasonembed.index import encode
    from reasonembed.storage import open_run

    enc_cfg = EncodeJobConfig(
        run_id=cfg.run_id, out=cfg.out, seed=cfg.seed, ray=cfg.ray, storage=cfg.storage,
        data={"path": f"<pool:{task.benchmark}/{task.name}:{task.metadata.get('revision', '')}>"},
        embedder=embedder.cfg.model_copy(update={"query_instruction": None}), engine=cfg.engine,
        index=cfg.index.model_copy(update={"build": False}), stage=f"encode-pool/{task.benchmark}/{task.name}",
    )
    builder, n = corpus_dataset_builder(task, doc_ids, texts)
    # The pooled documents are the stage's input: a run dir whose stage was made from other pools (edited qrels or
    # corpus) is refused by the encode job rather than reused with stale embeddings.
    digest = hashlib.sha256("\0".join(f"{d}\0{t}" for d, t in zip(doc_ids, texts, strict=True)).encode())
    summary = encode.run(enc_cfg, dataset_builder=builder, n_rows=n,
                         inputs={f"pool-docs:{task.benchmark}/{task.name}": digest.hexdigest()[:16]})
    ids, x = encode.load_embeddings(open_run(cfg.out, cfg.run_id, cfg.storage).stage(enc_cfg.stage))
    return dict(zip(ids, x, strict=True)), {"encode_s": round(time.time() - t0, 2), "tokens": summary.tokens,
                                            "truncated": summary.truncated, "encode_stage": summary.stage}


def dense_pool_run(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder,
                   pools: Mapping[str, Sequence[str]]) -> tuple[Run, dict]:
    """Exact inner product of each query with its own pool's documents (module docstring)."""
    union = list(dict.fromkeys(d for qid in task.queries.ids for d in pools.get(qid, ())))
    emb, info = pool_embeddings(cfg, task, embedder, union)
    instructions = query_instructions(cfg, task, embedder)
    t0 = time.time()
    q = encode_queries(embedder, task.queries.texts, instructions.per_query)
    run: Run = {}
    not_encoded = 0
    for qid, vec in zip(task.queries.ids, q.embeddings, strict=True):
        docs = [d for d in pools.get(qid, ()) if d in emb]  # the encode job drops empty texts as error rows
        not_encoded += len(pools.get(qid, ())) - len(docs)
        scores = np.stack([emb[d] for d in docs]) @ vec if docs else np.zeros(0, np.float32)
        run[qid] = {d: float(s) for d, s in zip(docs, scores.tolist(), strict=True)}
    info.update(query_s=round(time.time() - t0, 2), queries_truncated=q.n_truncated, **instructions.info())
    if not_encoded:
        info["pool_rows_not_encoded"] = not_encoded
    return run, info


def pool_run(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder | None) -> tuple[Run, dict]:
    """The pool-protocol run of ``task`` for ``cfg.retriever`` (dense, bm25 or hybrid), with its report fields."""
    pools, stats = query_pools(task)
    info: dict = {"protocol": "pool", "top_k": pool_depth(cfg), **stats.info()}
    if cfg.retriever == "bm25":
        return bm25_pool_run(task, pools, cfg.bm25), info
    run, dense_info = dense_pool_run(cfg, task, embedder, pools)
    info.update(dense_info)
    if cfg.retriever == "hybrid":
        run = fuse(run, bm25_pool_run(task, pools, cfg.bm25), cfg.hybrid_alpha, max(stats.largest_pool, 1))
    return run, info
