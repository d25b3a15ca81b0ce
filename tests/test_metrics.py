"""Metrics against hand-computed cases and against pytrec_eval (trec_eval) on real qrels with real BM25 runs."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonembed.data import load_task
from reasonembed.evaluation.bm25 import bm25_run
from reasonembed.evaluation.metrics import evaluate, metric_names, query_metrics, rank_docs
from reasonembed.evaluation.runs import top_k

K_VALUES = (1, 5, 10, 100)
TOL = 1e-6


def pytrec_reference(qrels, run, k_values=K_VALUES, relevance_level=1):
    """pytrec_eval's numbers under our key names; MRR@k is recip_rank on the run cut to its top k."""
    ks = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks},1", f"map_cut.{ks}", "map", "recip_rank"}
    ev = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_level)
    full = ev.evaluate(run)
    out = {q: {} for q in full}
    for q, m in full.items():
        for k in k_values:
            out[q][f"ndcg_at_{k}"] = m[f"ndcg_cut_{k}"]
            out[q][f"recall_at_{k}"] = m[f"recall_{k}"]
            out[q][f"precision_at_{k}"] = m[f"P_{k}"]
            out[q][f"map_at_{k}"] = m[f"map_cut_{k}"]
        out[q]["map"] = m["map"]
        out[q]["mrr"] = m["recip_rank"]
        out[q]["accuracy_at_1"] = m["P_1"]
    for k in k_values:
        cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=relevance_level).evaluate(
            top_k(run, k)
        )
        for q, m in cut.items():
            out[q][f"mrr_at_{k}"] = m["recip_rank"]
    return out


def assert_matches_pytrec(qrels, run, relevance_level=1):
    ours = evaluate(qrels, run, K_VALUES, relevance_level=relevance_level, missing="skip")
    ref = pytrec_reference(qrels, run, relevance_level=relevance_level)
    assert set(ours.per_query) == set(ref), "the same queries must be scored"
    worst = 0.0
    for q, vals in ref.items():
        for m, v in vals.items():
            diff = abs(ours.per_query[q][m] - v)
            worst = max(worst, diff)
            assert diff <= TOL, f"query {q} metric {m}: ours {ours.per_query[q][m]} pytrec_eval {v}"
    for m in metric_names(K_VALUES):
        ref_mean = float(np.mean([ref[q][m] for q in ref]))
        assert abs(ours.mean[m] - ref_mean) <= TOL, m
    return ours, worst


# ----------------------------------------------------------------------------------------------- hand-computed


def test_graded_ndcg_by_hand():
    rels = {"a": 2, "b": 1, "c": 0, "d": 3}
    ranked = ["a", "c", "b", "x"]  # d (rel 3) never retrieved
    m = query_metrics(rels, ranked, (3, 10))
    dcg = 2 / math.log2(2) + 0 + 1 / math.log2(4)
    idcg3 = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg_at_3"] == pytest.approx(dcg / idcg3, abs=1e-12)
    assert m["recall_at_3"] == pytest.approx(2 / 3)
    assert m["precision_at_10"] == pytest.approx(2 / 10), "P@k divides by k even when fewer docs are retrieved"
    assert m["mrr_at_3"] == 1.0
    assert m["map"] == pytest.approx((1 / 1 + 2 / 3) / 3)


def test_tie_break_and_float32():
    # trec_eval sorts by score desc, then doc id desc; scores compare as float32.
    assert rank_docs({"a": 1.0, "z": 1.0, "m": 2.0}) == ["m", "z", "a"]
    assert rank_docs({"0": 1.0 + 1e-9, "a": 1.0}) == ["a", "0"], "equal in float32 -> doc id decides"
    assert rank_docs({"0": 1.0 + 1e-6, "a": 1.0}) == ["0", "a"]
    with pytest.raises(ValueError, match="NaN"):
        rank_docs({"a": float("nan")}, "q1")


def test_queries_without_relevant_docs_and_missing_queries():
    qrels = {"q1": {"a": 0, "b": 0}, "q2": {"x": 1}, "q3": {"y": 1}}
    run = {"q1": {"a": 1.0}, "q2": {"x": 0.5, "z": 0.9}, "unjudged": {"x": 1.0}}
    r = evaluate(qrels, run, (1, 10))
    assert r.per_query["q1"]["ndcg_at_10"] == 0.0 and r.per_query["q1"]["recall_at_10"] == 0.0
    assert r.per_query["q2"]["mrr_at_10"] == 0.5
    assert r.missing_queries == ["q3"] and r.per_query["q3"]["ndcg_at_10"] == 0.0
    assert r.n_queries == 3 and r.ignored_run_queries == 1
    skip = evaluate(qrels, run, (1, 10), missing="skip")
    assert skip.n_queries == 2 and "q3" not in skip.per_query
    assert skip["mrr_at_10"] == pytest.approx(0.25)
    assert r["mrr_at_10"] == pytest.approx(0.5 / 3)


def test_negative_and_relevance_level_match_pytrec():
    qrels = {"r": {"x": -1, "y": 1, "z": 3, "w": 2}}
    run = {"r": {"x": 3.0, "y": 2.0, "z": 1.0, "u": 0.5, "w": 0.1}}
    for level in (1, 2, 3):
        assert_matches_pytrec(qrels, run, relevance_level=level)


def test_accuracy_at_1_equals_pytrec_p1():
    """Multiple choice: a few candidates per query, graded qrels with score-0 rows, a query whose judgements are all
    0 (scores 0), a tie at the top (broken by doc id descending, as trec_eval does) and an empty run."""
    qrels = {
        "right": {"a": 0, "b": 2, "c": 0},  # b first: correct
        "wrong": {"a": 1, "b": 0, "c": 0},  # b first: wrong
        "tie": {"a": 1, "z": 0},  # tied scores: z > a by doc id, so z is first: wrong
        "tie2": {"a": 0, "z": 3},  # the same tie, z relevant: right
        "none": {"a": 0, "b": 0},  # no relevant candidate at all
        "empty": {"a": 1},  # the run has nothing for it
    }
    run = {"right": {"a": 0.1, "b": 0.9, "c": 0.5}, "wrong": {"a": 0.2, "b": 0.7, "c": 0.1},
           "tie": {"a": 0.5, "z": 0.5}, "tie2": {"a": 0.5, "z": 0.5}, "none": {"a": 0.3, "b": 0.2}, "empty": {}}
    r = evaluate(qrels, run, (1, 10))
    assert {q: v["accuracy_at_1"] for q, v in r.per_query.items()} == {
        "right": 1.0, "wrong": 0.0, "tie": 0.0, "tie2": 1.0, "none": 0.0, "empty": 0.0}
    assert r["accuracy_at_1"] == pytest.approx(2 / 6)
    p1 = pytrec_eval.RelevanceEvaluator(qrels, {"P.1"}).evaluate({q: d for q, d in run.items() if d})
    for q, m in p1.items():
        assert r.per_query[q]["accuracy_at_1"] == m["P_1"], q
    assert_matches_pytrec(qrels, {q: d for q, d in run.items() if d})


def test_bad_arguments():
    with pytest.raises(ValueError, match="missing"):
        evaluate({"q": {"a": 1}}, {}, missing="drop")
    with pytest.raises(ValueError, match="k_values"):
        evaluate({"q": {"a": 1}}, {}, k_values=(0,))


# ------------------------------------------------------------------------------- real qrels, real BM25 runs


@pytest.fixture(scope="module")
def scifact(data_dir):
    task = load_task("beir/scifact", data_dir)
    return task, bm25_run(task, k=1000)


@pytest.fixture(scope="module")
def impliret(data_dir):
    task = load_task("impliret/wknow-multispeaker", data_dir)
    return task, bm25_run(task, k=300)


def test_scifact_bm25_matches_pytrec(scifact):
    task, run = scifact
    ours, _ = assert_matches_pytrec(task.qrels, run)
    assert ours.n_queries == 300
    assert 0.6 < ours["ndcg_at_10"] < 0.7


def test_impliret_bm25_matches_pytrec(impliret):
    task, run = impliret
    ours, _ = assert_matches_pytrec(task.qrels, run)
    assert ours.n_queries == 1500


def test_scifact_ties_and_graded_levels_match_pytrec(scifact):
    """Rounded scores make many ties (tie-breaking by doc id); graded levels derived from the real qrels plus
    judged non-relevant docs from the run exercise gains, relevance levels and the ideal ranking."""
    task, run = scifact
    run = top_k(run, 200)
    tied = {q: {d: round(s, 0) for d, s in docs.items()} for q, docs in run.items()}
    assert_matches_pytrec(task.qrels, tied)
    graded = {}
    for q, rels in task.qrels.items():
        graded[q] = {d: 1 + zlib.crc32(f"{q}:{d}".encode()) % 3 for d in rels}
        for d in list(run[q])[:3]:
            graded[q].setdefault(d, 0 if zlib.crc32(d.encode()) % 2 else -1)
        for d in list(run[q])[3:5]:
            graded[q].setdefault(d, 1 + zlib.crc32(d.encode()) % 2)
    for level in (1, 2):
        assert_matches_pytrec(graded, run, relevance_level=level)


def test_random_dense_like_run_matches_pytrec(impliret):
    """Scores in [-1, 1] over random subsets (a dense retriever's shape) with float32-close values."""
    task, _ = impliret
    rng = np.random.default_rng(0)
    ids = np.array(task.corpus.ids)
    run = {}
    for q in task.queries.ids[:400]:
        docs = rng.choice(ids, size=200, replace=False).tolist() + list(task.qrels[q])
        scores = rng.uniform(-1, 1, size=len(docs)).astype(np.float32)
        scores[:20] = scores[0]  # a block of exact ties
        run[q] = {d: float(s) for d, s in zip(docs, scores, strict=True)}
    qrels = {q: task.qrels[q] for q in run}
    assert_matches_pytrec(qrels, run)


ids = st.sampled_from([f"d{i}" for i in range(12)])


@settings(max_examples=150, deadline=None)
@given(
    qrels=st.dictionaries(st.sampled_from(["q1", "q2", "q3"]), st.dictionaries(ids, st.integers(-1, 3), min_size=1)),
    run=st.dictionaries(
        st.sampled_from(["q1", "q2", "q3", "q4"]),
        st.dictionaries(ids, st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0 + 1e-9, 2.0, -1.0]), min_size=1),
    ),
    level=st.integers(1, 2),
)
def test_property_equals_pytrec(qrels, run, level):
    if not set(qrels) & set(run):
        return
    assert_matches_pytrec(qrels, run, relevance_level=level)
