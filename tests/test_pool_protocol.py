"""`evaluate --protocol pool` on real SciFact pools: BM25, dense (all-MiniLM-L6-v2), hybrid and multiple choice.

Every check is against independent references: pytrec_eval on the written run file restricted to the pool, the
corpus-protocol BM25 scores, and inner products of embeddings computed here with the embedder directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from pool_fixtures import MISSING_DOC, multiple_choice_folder, pool_folder, read_qrels

from reasonembed.config.evaluate import EvaluateJobConfig
from reasonembed.evaluation.pipeline import run as evaluate_run
from reasonembed.evaluation.runs import read_trec_run

TOL = 1e-4


@pytest.fixture(scope="module")
def pools(tmp_path_factory, scifact_dir) -> Path:
    return pool_folder(scifact_dir, tmp_path_factory.mktemp("pools") / "scipool")


@pytest.fixture(scope="module")
def choices(tmp_path_factory, scifact_dir) -> Path:
    return multiple_choice_folder(scifact_dir, tmp_path_factory.mktemp("mc") / "scichoice")


def _run(folder: Path, out: Path, **fields) -> tuple[dict, dict, dict]:
    """Evaluate ``folder`` with the pool protocol; (task report, run from run.trec, report.json)."""
    cfg = EvaluateJobConfig.model_validate({"tasks": [str(folder)], "out": str(out), "protocol": "pool",
                                            "corpus_encoding": "local", "plots": False, **fields})
    report = json.loads(Path(evaluate_run(cfg)["report"]).read_text())
    key = f"beir/{folder.name}"
    return report["tasks"][key], read_trec_run(out / key / "run.trec"), report


def _excluded(folder: Path) -> dict[str, set[str]]:
    queries = map(json.loads, (folder / "queries.jsonl").read_text().splitlines())
    return {q["id"]: set(q.get("excluded_ids", ())) for q in queries}


def pytrec_on_pool(qrels: dict, run: dict, measures: set[str]) -> dict[str, float]:
    """pytrec_eval's means over the judged queries on ``run`` restricted to each query's pool."""
    restricted = {q: {d: s for d, s in docs.items() if d in qrels.get(q, {})} for q, docs in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(restricted)
    assert set(per_query) == set(qrels), "every judged query must have a ranked pool"
    names = next(iter(per_query.values())).keys()
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in names}


def assert_ranks_exactly_the_pools(folder: Path, run: dict, keep: int | None = None) -> None:
    """Each query's run holds only its own pool's documents, and all of them (less excluded and missing ones, and
    cut to ``keep`` when set)."""
    qrels, excluded = read_qrels(folder), _excluded(folder)
    corpus = {json.loads(line)["id"] for line in (folder / "corpus.jsonl").read_text().splitlines()}
    assert set(run) == set(qrels)
    for q, docs in run.items():
        pool = {d for d in qrels[q] if d in corpus} - excluded[q]
        assert set(docs) <= pool, f"query {q} ranked documents outside its pool: {set(docs) - pool}"
        assert len(docs) == (len(pool) if keep is None else min(keep, len(pool))), q


def test_bm25_pool_equals_pytrec_on_the_pool(pools, tmp_path):
    """BM25 ranks exactly each pool, with the whole corpus's BM25 scores, and report.json's metrics equal
    pytrec_eval's on the run restricted to the pool; the report says which protocol it used, first line included."""
    from reasonembed.data import load_task
    from reasonembed.evaluation.bm25 import bm25_run

    task_report, run, report = _run(pools, tmp_path / "bm25", retriever="bm25")
    assert report["protocol"] == "pool" and task_report["extra"]["protocol"] == "pool"
    assert "protocol pool" in (tmp_path / "bm25" / "report.md").read_text().splitlines()[0]
    assert_ranks_exactly_the_pools(pools, run)
    extra = task_report["extra"]
    # The pool row on a document missing from the corpus is dropped and counted (by the loader, before the pools).
    assert task_report["data"]["validation"]["qrels_unknown_docs_dropped"] == 1
    assert extra["pool_docs_not_in_corpus"] == 0 and extra["excluded_removed"] == 1 and extra["top_k"] is None
    qrels = read_qrels(pools)
    ref = pytrec_on_pool(qrels, run, {"ndcg_cut.10", "P.1", "map", "recall.100"})
    metrics = task_report["metrics"]
    assert abs(metrics["ndcg_at_10"] - ref["ndcg_cut_10"]) <= TOL
    assert abs(metrics["accuracy_at_1"] - ref["P_1"]) <= TOL
    assert abs(metrics["map"] - ref["map"]) <= TOL and abs(metrics["recall_at_100"] - ref["recall_100"]) <= TOL
    assert len(qrels) == task_report["n_queries"] == 50
    # Same statistics as a corpus search: wherever the corpus run has a pool document, the score is the same.
    corpus_run = bm25_run(load_task(str(pools)), k=1000)
    shared = [(q, d) for q, docs in run.items() for d in docs if d in corpus_run[q]]
    assert len(shared) > 300
    assert all(abs(run[q][d] - corpus_run[q][d]) <= 1e-5 for q, d in shared)


def test_pool_top_k_cuts_only_when_set(pools, tmp_path):
    _, run, _ = _run(pools, tmp_path / "k3", retriever="bm25", top_k=3)
    assert_ranks_exactly_the_pools(pools, {q: docs for q, docs in run.items()}, keep=3)


def test_multiple_choice_accuracy_at_1(choices, tmp_path):
    """Four candidates per query, one correct: accuracy@1 is the share of queries whose top candidate is the
    correct one, and pytrec_eval's P_1."""
    from reasonembed.evaluation.metrics import rank_docs

    task_report, run, _ = _run(choices, tmp_path / "mc", retriever="bm25")
    qrels = read_qrels(choices)
    assert all(len(docs) == 4 for docs in run.values())
    by_hand = np.mean([qrels[q][rank_docs(docs, q)[0]] > 0 for q, docs in run.items()])
    assert 0.2 < by_hand < 1.0
    assert task_report["metrics"]["accuracy_at_1"] == pytest.approx(by_hand, abs=1e-12)
    assert abs(task_report["metrics"]["accuracy_at_1"] - pytrec_on_pool(qrels, run, {"P.1"})["P_1"]) <= TOL


def test_dense_and_hybrid_pool_minilm(pools, tmp_path, minilm_path):
    """Dense: each pooled document is embedded once and each query scored against its own pool by exact inner
    product (checked against embeddings made here); hybrid fuses the two pool runs and stays in the pool."""
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.data import load_task
    from reasonembed.models.embedder import Embedder

    task_report, run, _ = _run(pools, tmp_path / "dense", embedder={"model": "minilm", "device": "cpu"})
    assert_ranks_exactly_the_pools(pools, run)
    qrels = read_qrels(pools)
    ref = pytrec_on_pool(qrels, run, {"ndcg_cut.10", "P.1"})
    assert abs(task_report["metrics"]["ndcg_at_10"] - ref["ndcg_cut_10"]) <= TOL
    assert abs(task_report["metrics"]["accuracy_at_1"] - ref["P_1"]) <= TOL
    extra = task_report["extra"]
    assert extra["pool_docs"] == len({d for v in qrels.values() for d in v}) - 1  # one pooled id is not in the corpus
    assert extra["instruction_source"] == "none" and extra["queries_with_own_instruction"] == 0

    task = load_task(str(pools))
    embedder = Embedder(EmbedderConfig(model="minilm", device="cpu"))
    q = task.queries.ids[0]
    docs = sorted(run[q])[:4]
    text_of = dict(zip(task.corpus.ids, task.corpus.texts, strict=True))
    expected = embedder.encode([text_of[d] for d in docs]) @ embedder.encode([task.queries.texts[0]], is_query=True)[0]
    assert np.allclose([run[q][d] for d in docs], expected, atol=1e-5)

    hybrid_report, hybrid, _ = _run(pools, tmp_path / "hybrid", retriever="hybrid",
                                    embedder={"model": "minilm", "device": "cpu"})
    assert_ranks_exactly_the_pools(pools, hybrid)
    assert abs(hybrid_report["metrics"]["ndcg_at_10"] - pytrec_on_pool(qrels, hybrid, {"ndcg_cut.10"})["ndcg_cut_10"]
               ) <= TOL
    assert MISSING_DOC not in {d for docs in hybrid.values() for d in docs}


def test_pool_document_missing_from_the_corpus_is_left_out_and_counted():
    """A task built without the loader's checks: the pool row on an unknown document is left out and counted."""
    from reasonembed.data.types import Corpus, Queries, RetrievalTask
    from reasonembed.evaluation.pool import bm25_pool_run, query_pools

    task = RetrievalTask("t", Corpus(["d1", "d2", "d3"], ["red apples", "green pears", "red cars"]),
                         Queries(["q"], ["red apples"]), {"q": {"d1": 1, "ghost": 1, "d3": 0}})
    pools, stats = query_pools(task)
    assert pools == {"q": ["d1", "d3"]} and stats.info()["pool_docs_not_in_corpus"] == 1
    run = bm25_pool_run(task, pools)
    assert set(run["q"]) == {"d1", "d3"} and run["q"]["d1"] > run["q"]["d3"] > 0
