"""TREC run I/O and BRIGHT's excluded-id removal, on real BRIGHT queries and a real BM25 run."""

from __future__ import annotations

import pytest
import pytrec_eval

from reasonembed.data import load_bright, load_task
from reasonembed.evaluation.bm25 import bm25_run
from reasonembed.evaluation.metrics import evaluate, rank_docs
from reasonembed.evaluation.runs import ExclusionStats, read_trec_run, remove_excluded, top_k, write_trec_run


@pytest.mark.parametrize("name", ["leetcode", "aops", "theoremqa_questions"])
def test_excluded_ids_removed_before_ranking(data_dir, name):
    """BRIGHT protocol: a 2000-deep run whose best hits are the query's excluded ids; after removal the gold ids
    lead and nDCG@10 is computed on what is left."""
    task = load_bright(name, data_dir=data_dir / "bright", require_corpus=False)
    assert task.excluded_ids, f"{name} carries excluded ids"
    run, expected_removed = {}, 0
    for qid in task.queries.ids:
        ex = task.excluded_ids.get(qid, [])[:1500]
        gold = sorted(task.qrels[qid])
        docs = {d: 100.0 - i * 0.01 for i, d in enumerate(ex)}  # excluded ids on top
        docs.update({d: 50.0 - i * 0.01 for i, d in enumerate(gold)})
        for i in range(2000 - len(docs)):
            docs[f"filler-{i}"] = 10.0 - i * 0.001
        run[qid] = docs
        expected_removed += len(ex)
    with_excluded = evaluate(task.qrels, run)
    stats = ExclusionStats()
    cleaned = remove_excluded(run, task.excluded_ids, k=1000, stats=stats)
    after = evaluate(task.qrels, cleaned)

    assert stats.n_removed == expected_removed
    assert stats.n_queries_affected == sum(1 for q in task.queries.ids if task.excluded_ids.get(q))
    for qid, docs in cleaned.items():
        assert not set(docs) & set(task.excluded_ids.get(qid, ())), qid
        assert len(docs) == min(1000, 2000 - min(1500, len(task.excluded_ids.get(qid, [])))), qid
        assert rank_docs(docs)[: len(task.qrels[qid])] == sorted(task.qrels[qid]), "gold ids lead once cleaned"
    assert after["ndcg_at_10"] == pytest.approx(1.0)
    affected = [q for q in task.queries.ids if task.excluded_ids.get(q)]
    assert all(with_excluded.per_query[q]["ndcg_at_10"] < 1.0 for q in affected)
    assert run[affected[0]] != cleaned[affected[0]], "the input run is not modified"
    assert len(run[affected[0]]) == 2000


def test_interleaved_exclusions_equal_a_run_without_them(data_dir):
    task = load_bright("leetcode", data_dir=data_dir / "bright", require_corpus=False)
    run, clean = {}, {}
    for qid in task.queries.ids:
        ex = task.excluded_ids.get(qid, [])[:40]
        gold = list(task.qrels[qid])
        docs = {}
        for i in range(60):  # excluded, gold and filler docs interleaved in score
            if i < len(ex):
                docs[ex[i]] = 3.0 - i * 0.02
            docs[f"f{i}"] = 3.0 - i * 0.02 - 0.005
        for j, d in enumerate(gold):
            docs[d] = 2.9 - j * 0.3
        run[qid] = docs
        clean[qid] = {d: s for d, s in docs.items() if d not in set(ex)}
    got = evaluate(task.qrels, remove_excluded(run, task.excluded_ids))
    want = evaluate(task.qrels, clean)
    assert got.mean == want.mean
    assert got["ndcg_at_10"] > evaluate(task.qrels, run)["ndcg_at_10"]
    assert remove_excluded({"q": {"a": 1.0}}, {"q": ["N/A"]}) == {"q": {"a": 1.0}}


@pytest.fixture(scope="module")
def scifact_run(data_dir):
    task = load_task("beir/scifact", data_dir)
    return task, bm25_run(task, k=100)


def test_trec_round_trip(scifact_run, tmp_path):
    task, run = scifact_run
    path = write_trec_run(run, tmp_path / "out" / "run.trec", tag="bm25")
    lines = path.read_text().splitlines()
    assert len(lines) == sum(len(v) for v in run.values())
    first = lines[0].split()
    assert len(first) == 6 and first[1] == "Q0" and first[3] == "1" and first[5] == "bm25"
    back = read_trec_run(path)
    assert back == run, "scores survive the text round trip exactly"
    assert evaluate(task.qrels, back).mean == evaluate(task.qrels, run).mean
    # trec_eval's own parser reads the file and scores it the same way
    with open(path) as f:
        parsed = pytrec_eval.parse_run(f)
    ev = pytrec_eval.RelevanceEvaluator(task.qrels, {"ndcg_cut.10"})
    ref = ev.evaluate(parsed)
    ours = evaluate(task.qrels, back, missing="skip")
    for q, m in ref.items():
        assert ours.per_query[q]["ndcg_at_10"] == pytest.approx(m["ndcg_cut_10"], abs=1e-9)
    qid = next(iter(run))
    ranks = [int(line.split()[3]) for line in lines if line.split()[0] == qid]
    assert ranks == list(range(1, len(ranks) + 1))


def test_trec_bad_input(tmp_path):
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 0.4\n")
    with pytest.raises(ValueError, match=r"bad.trec:2: expected 6 columns"):
        read_trec_run(bad)
    bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d1 2 0.4 tag\n")
    with pytest.raises(ValueError, match="listed twice"):
        read_trec_run(bad)
    bad.write_text("q1 Q0 d1 1 high tag\n")
    with pytest.raises(ValueError, match="not a number"):
        read_trec_run(bad)
    with pytest.raises(ValueError, match="tag"):
        write_trec_run({"q": {"d": 1.0}}, tmp_path / "x.trec", tag="two words")
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run({"q": {"d 1": 1.0}}, tmp_path / "x.trec")
    with pytest.raises(FileNotFoundError):
        read_trec_run(tmp_path / "missing.trec")


def test_top_k(scifact_run):
    _, run = scifact_run
    cut = top_k(run, 10)
    qid = next(iter(run))
    assert list(cut[qid]) == rank_docs(run[qid])[:10]
    with pytest.raises(ValueError):
        top_k(run, 0)
