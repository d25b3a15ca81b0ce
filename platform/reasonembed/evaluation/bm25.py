"""BM25 baseline through ``bm25s`` (Lù 2024, arXiv 2407.03618).

Score of document d for query q (``method="lucene"``, Lucene's BM25; Robertson & Zaragoza 2009):

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Tokenisation is bm25s's: lower-casing, the scikit-learn token pattern ``\\b\\w\\w+\\b``, English stop words, and no
stemming by default. These defaults are exactly the setting ImpliRet's authors used (``bm25s.tokenize`` and
``bm25s.BM25()`` with no arguments, ``Retrieval/retrievals/BM_retriever.py``), and measured here they give:

- ImpliRet multi-speaker nDCG@10 x100: wknow 15.18 (published 15.20), temporal 11.76 (published 11.76);
  without the stop-word list they drop to 15.10 and 11.45, so the list is part of the published setting;
- BEIR SciFact nDCG@10: 0.6617 (BEIR paper 0.665; Anserini flat 0.679). Snowball stemming (PyStemmer) gives
  0.6863 on SciFact, above the [0.655, 0.685] band of the published settings, so it stays off by default.

Documents that share no term with the query score 0 and are left out of the run: their order would be arbitrary.
Queries with no term in the index vocabulary get an empty run (counted in ``BM25Stats``).

Pool protocol (``BM25Retriever.score_pools``): the index and its statistics (N, df, avgdl) are the whole corpus's,
as in a corpus search, but each query scores only its own pool documents, and every pool document is ranked, a
zero score included: a pool is a fixed candidate list, and its zero-score candidates are ordered by trec_eval's tie
rule (doc id) like any other tie.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from reasonembed.config.base import StrictModel
from reasonembed.data.types import RetrievalTask

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


class BM25Config(StrictModel):
    """BM25 settings; the defaults reproduce the published bm25s baselines (module docstring)."""

    k1: float = Field(1.5, gt=0, description="Term-frequency saturation k1 (bm25s default 1.5).")
    b: float = Field(0.75, ge=0, le=1, description="Length normalisation b (bm25s default 0.75).")
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = Field(
        "lucene", description="bm25s scoring variant; 'lucene' is Lucene/Anserini's BM25."
    )
    stopwords: str | None = Field(
        "english", description="Stop-word list for bm25s.tokenize ('english'/'en', another bm25s language, or null)."
    )
    stemmer: str | None = Field(
        None, description="Snowball stemmer language via PyStemmer (e.g. 'english'); null: no stemming."
    )
    top_k: int = Field(1000, ge=1, description="Documents kept per query (capped at the corpus size).")


@dataclass
class BM25Stats:
    """What a search did: queries, queries with no known term (empty runs), docs returned in total."""

    n_queries: int = 0
    n_empty_queries: int = 0
    n_results: int = 0


def _stemmer(language: str | None):
    if language is None:
        return None
    try:
        import Stemmer  # PyStemmer; optional, only for stemmed BM25
    except ImportError as exc:
        raise ImportError(
            f"BM25 stemmer={language!r} needs PyStemmer: `pip install PyStemmer`, or set stemmer: null"
        ) from exc
    return Stemmer.Stemmer(language)


class BM25Retriever:
    """Index a corpus once, then search query batches; results are ``run[qid][docid] = score``."""

    def __init__(self, cfg: BM25Config | None = None) -> None:
        import bm25s  # imported here so that importing the evaluation package stays light

        self._bm25s = bm25s
        self.cfg = cfg or BM25Config()
        self._stem = _stemmer(self.cfg.stemmer)
        self._model = None
        self.doc_ids: list[str] = []
        self.last_stats = BM25Stats()

    def _tokenize(self, texts: list[str], return_ids: bool):
        return self._bm25s.tokenize(
            texts, stopwords=self.cfg.stopwords, stemmer=self._stem, return_ids=return_ids, show_progress=False
        )

    def index(self, doc_ids: list[str], texts: list[str]) -> BM25Retriever:
        """Build the index; ``doc_ids[i]`` names ``texts[i]``."""
        if len(doc_ids) != len(texts):
            raise ValueError(f"BM25 index: {len(doc_ids)} doc ids but {len(texts)} texts")
        if not doc_ids:
            raise ValueError("BM25 index: the corpus is empty")
        model = self._bm25s.BM25(k1=self.cfg.k1, b=self.cfg.b, method=self.cfg.method)
        model.index(self._tokenize(texts, return_ids=True), show_progress=False)
        self._model = model
        self.doc_ids = list(doc_ids)
        return self

    def search(self, query_ids: list[str], query_texts: list[str], k: int | None = None) -> Run:
        """Top-k documents per query (k defaults to ``cfg.top_k``; capped at the corpus size)."""
        if self._model is None:
            raise RuntimeError("BM25Retriever.search called before index()")
        if len(query_ids) != len(query_texts):
            raise ValueError(f"BM25 search: {len(query_ids)} query ids but {len(query_texts)} texts")
        k = min(k or self.cfg.top_k, len(self.doc_ids))
        vocab = self._model.vocab_dict
        tokens = [[t for t in q if t in vocab] for q in self._tokenize(list(query_texts), return_ids=False)]
        run: Run = {qid: {} for qid in query_ids}
        active = [i for i, t in enumerate(tokens) if t]
        stats = BM25Stats(n_queries=len(query_ids), n_empty_queries=len(query_ids) - len(active))
        if stats.n_empty_queries:
            logger.warning("BM25: %d queries share no term with the index; their runs are empty", stats.n_empty_queries)
        if active:
            docs, scores = self._model.retrieve([tokens[i] for i in active], k=k, show_progress=False)
            for row, i in enumerate(active):
                keep = scores[row] > 0
                idx, sc = np.asarray(docs[row])[keep], np.asarray(scores[row])[keep]
                run[query_ids[i]] = {self.doc_ids[d]: float(s) for d, s in zip(idx.tolist(), sc.tolist(), strict=True)}
        stats.n_results = sum(len(v) for v in run.values())
        self.last_stats = stats
        return run


    def score_pools(self, query_ids: list[str], query_texts: list[str], pools: Mapping[str, Sequence[str]]) -> Run:
        """``run[qid][docid]`` for exactly the docs of ``pools[qid]`` (ids of the indexed corpus), nothing else."""
        if self._model is None:
            raise RuntimeError("BM25Retriever.score_pools called before index()")
        position = {d: i for i, d in enumerate(self.doc_ids)}
        vocab = self._model.vocab_dict
        tokens = [[t for t in q if t in vocab] for q in self._tokenize(list(query_texts), return_ids=False)]
        run: Run = {}
        stats = BM25Stats(n_queries=len(query_ids))
        for qid, toks in zip(query_ids, tokens, strict=True):
            rows = [position[d] for d in pools.get(qid, ())]
            if toks:
                scores = self._model.get_scores(toks)[rows]
            else:
                stats.n_empty_queries += 1
                scores = np.zeros(len(rows))
            run[qid] = {self.doc_ids[r]: float(s) for r, s in zip(rows, scores.tolist(), strict=True)}
        stats.n_results = sum(len(v) for v in run.values())
        if stats.n_empty_queries:
            logger.warning("BM25: %d queries share no term with the index; their pools all score 0",
                           stats.n_empty_queries)
        self.last_stats = stats
        return run


def bm25_run(task: RetrievalTask, cfg: BM25Config | None = None, k: int | None = None) -> Run:
    """Index ``task.corpus`` and search ``task.queries`` (raw query text: BM25 takes no instruction)."""
    retriever = BM25Retriever(cfg).index(task.corpus.ids, task.corpus.texts)
    return retriever.search(task.queries.ids, task.queries.texts, k)
