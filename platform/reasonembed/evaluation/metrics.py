"""Retrieval metrics with trec_eval's exact conventions, in plain Python/numpy, under MTEB's key names.

A run is ``run[qid][docid] = score`` (higher is better); qrels are ``qrels[qid][docid] = int``.

Ranking (trec_eval ``form_res_rels``): documents are sorted by score, descending, **compared as float32** (trec_eval
stores scores as C ``float``), ties broken by doc id in descending byte order. Measured against pytrec_eval:
scores that differ only beyond float32 precision tie.

Per query, with ranked docs ``d_1..d_n``, ``rel(d)`` from the qrels (0 when unjudged), the relevant set
``R = {d : rel(d) >= relevance_level}`` (trec_eval ``-l``, default 1) and the cutoff ``k``:

- ``ndcg_at_k`` = DCG@k / IDCG@k, DCG@k = sum_{i<=k} g(d_i) / log2(i + 1), with the *graded* gain
  g(d) = rel(d) if rel(d) > 0 else 0 (trec_eval ``ndcg_cut``: linear gains, independent of relevance_level);
  IDCG@k is the same sum over the judged gains sorted descending. 0 when no judged doc has a positive gain.
- ``recall_at_k`` = |R ∩ top k| / |R| (0 when R is empty), ``precision_at_k`` = |R ∩ top k| / k.
- ``map`` = (1/|R|) sum_{i : d_i in R} |R ∩ top i| / i over the whole run; ``map_at_k`` stops at rank k
  (trec_eval ``map_cut``). 0 when R is empty.
- ``mrr_at_k`` = 1 / (rank of the first doc of R within the top k), else 0; ``mrr`` without a cutoff
  (trec_eval ``recip_rank``). ``mrr_at_k`` equals ``recip_rank`` on the run cut to its top k.
- ``accuracy_at_1`` = 1 when the top-ranked doc d_1 is in R, else 0 (0 for an empty run): the multiple-choice
  score (does the model put a correct candidate first?). It is trec_eval's ``P_1``; ties at the top are broken by
  the ranking above (float32 score, then doc id descending), so it is as deterministic as every other metric.

Averaging: arithmetic mean over judged queries (keys of the qrels). A judged query missing from the run scores 0
(trec_eval ``-c``) by default, or is left out (``missing="skip"``, what pytrec_eval/MTEB/BEIR average over). Run
queries without judgements are ignored. Queries whose judgements are all non-relevant are kept and score 0, as in
trec_eval.

References: trec_eval 9 (usnistgov/trec_eval, ``m_ndcg_cut.c``, ``m_map.c``, ``m_recip_rank.c``); pytrec_eval
(Van Gysel & de Rijke, SIGIR 2018); MTEB's retrieval evaluator key names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_K_VALUES: tuple[int, ...] = (1, 5, 10, 100)
MAIN_METRIC = "ndcg_at_10"
# The metrics a report shows by default (the paper's nDCG/recall cut-offs plus MRR, MAP and accuracy@1).
HEADLINE_METRICS: tuple[str, ...] = (
    "ndcg_at_1", "ndcg_at_5", "ndcg_at_10", "ndcg_at_100", "recall_at_10", "recall_at_100", "mrr_at_10", "map",
    "accuracy_at_1",
)


def rank_docs(doc_scores: Mapping[str, float], qid: str = "?") -> list[str]:
    """Doc ids in trec_eval order: score descending as float32, ties by doc id descending.

    A NaN score is a ValueError (it has no place in an order)."""
    if not doc_scores:
        return []
    ids = list(doc_scores)
    scores = np.asarray([doc_scores[d] for d in ids], dtype=np.float64)
    if np.isnan(scores).any():
        bad = [ids[i] for i in np.flatnonzero(np.isnan(scores))[:5]]
        raise ValueError(f"query {qid}: NaN scores for docs {bad}")
    f32 = scores.astype(np.float32).tolist()
    order = sorted(range(len(ids)), key=lambda i: (f32[i], ids[i]), reverse=True)
    return [ids[i] for i in order]


def _dcg(gains: Iterable[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains) if g > 0)


def query_metrics(
    rels: Mapping[str, int],
    ranked: list[str],
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    relevance_level: int = 1,
) -> dict[str, float]:
    """All metrics of one query from its judgements and its ranked doc ids (module docstring)."""
    ks = sorted(set(k_values))
    gains = [max(rels.get(d, 0), 0) for d in ranked]
    is_rel = [rels.get(d, 0) >= relevance_level for d in ranked]
    num_rel = sum(1 for r in rels.values() if r >= relevance_level)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)

    # Running sums over ranks: relevant hits and AP contributions up to each rank.
    hits = np.cumsum(is_rel, dtype=np.int64) if ranked else np.zeros(0, dtype=np.int64)
    first_rel = next((i + 1 for i, r in enumerate(is_rel) if r), None)
    ap_terms = [hits[i] / (i + 1) if r else 0.0 for i, r in enumerate(is_rel)]
    ap_cum = np.cumsum(ap_terms) if ranked else np.zeros(0)

    out: dict[str, float] = {}
    for k in ks:
        n = min(k, len(ranked))
        idcg = _dcg(ideal[:k])
        out[f"ndcg_at_{k}"] = _dcg(gains[:k]) / idcg if idcg > 0 else 0.0
        hit_k = int(hits[n - 1]) if n > 0 else 0
        out[f"recall_at_{k}"] = hit_k / num_rel if num_rel else 0.0
        out[f"precision_at_{k}"] = hit_k / k
        out[f"map_at_{k}"] = float(ap_cum[n - 1]) / num_rel if num_rel and n > 0 else 0.0
        out[f"mrr_at_{k}"] = 1.0 / first_rel if first_rel is not None and first_rel <= k else 0.0
    out["map"] = float(ap_cum[-1]) / num_rel if num_rel and ranked else 0.0
    out["mrr"] = 1.0 / first_rel if first_rel is not None else 0.0
    out["accuracy_at_1"] = 1.0 if is_rel and is_rel[0] else 0.0
    return out


def metric_names(k_values: Iterable[int] = DEFAULT_K_VALUES) -> list[str]:
    """The keys ``query_metrics`` returns, in a stable order."""
    names = []
    for prefix in ("ndcg_at", "recall_at", "precision_at", "map_at", "mrr_at"):
        names += [f"{prefix}_{k}" for k in sorted(set(k_values))]
    return names + ["map", "mrr", "accuracy_at_1"]


@dataclass
class EvalResult:
    """Metrics of one run against one set of qrels.

    Attributes:
        mean: metric -> mean over the averaged queries.
        per_query: qid -> metric -> value.
        n_queries: how many queries the mean is over.
        missing_queries: judged queries the run has no results for (0 or skipped, per ``missing``).
        ignored_run_queries: how many run queries have no judgements (not scored).
    """

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]]
    n_queries: int
    missing_queries: list[str] = field(default_factory=list)
    ignored_run_queries: int = 0

    def __getitem__(self, metric: str) -> float:
        return self.mean[metric]


def evaluate(
    qrels: Qrels,
    run: Run,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    *,
    relevance_level: int = 1,
    missing: Literal["zero", "skip"] = "zero",
) -> EvalResult:
    """Score a run against qrels with trec_eval conventions (module docstring)."""
    if missing not in ("zero", "skip"):
        raise ValueError(f"missing must be 'zero' or 'skip', got {missing!r}")
    ks = tuple(sorted(set(int(k) for k in k_values)))
    if not ks or ks[0] < 1:
        raise ValueError(f"k_values must be positive integers, got {k_values!r}")
    per_query: dict[str, dict[str, float]] = {}
    missing_q: list[str] = []
    for qid, rels in qrels.items():
        docs = run.get(qid)
        if not docs:
            missing_q.append(qid)
            if missing == "skip":
                continue
        per_query[qid] = query_metrics(rels, rank_docs(docs or {}, qid), ks, relevance_level)
    names = metric_names(ks)
    n = len(per_query)
    mean = {m: (math.fsum(v[m] for v in per_query.values()) / n if n else 0.0) for m in names}
    ignored = sum(1 for q in run if q not in qrels)
    return EvalResult(mean=mean, per_query=per_query, n_queries=n, missing_queries=missing_q, ignored_run_queries=ignored)
