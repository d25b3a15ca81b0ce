"""`reasonembed compare`: the table, the paper's numbers, paired significance, and the end-to-end CLI on pools."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from pool_fixtures import pool_folder, read_qrels
from scipy import stats

from reasonembed.data.types import Corpus, Queries, RetrievalTask
from reasonembed.evaluation.compare import compare, load_runs, main, render_markdown
from reasonembed.evaluation.metrics import evaluate
from reasonembed.evaluation.report import Report, task_report, write_report
from reasonembed.evaluation.runs import read_trec_run
from reasonembed.evaluation.significance import (
    betainc,
    paired_bootstrap,
    paired_t_test,
    t_two_sided_p,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ significance


def test_t_test_matches_scipy_and_the_fallback_formula():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 40)
    b = np.clip(a + rng.normal(0.05, 0.2, 40), 0, 1)
    assert paired_t_test(a, b) == pytest.approx(stats.ttest_rel(b, a).pvalue, rel=1e-12)
    for t, df in ((0.3, 5), (2.1, 39), (-4.0, 12), (10.0, 3), (0.0, 7)):
        assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-14)
    for a_, b_, x in ((0.5, 0.5, 0.3), (2.0, 3.0, 0.9), (20.0, 0.5, 0.99)):
        assert betainc(a_, b_, x) == pytest.approx(stats.beta.cdf(x, a_, b_), rel=1e-9)


def test_bootstrap_is_seeded_and_sensible():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, 50)
    noise = a + rng.normal(0, 0.1, 50)
    assert paired_bootstrap(a, noise) == paired_bootstrap(a, noise), "same seed, same p"
    assert 0.05 < paired_bootstrap(a, noise) <= 1.0
    assert paired_bootstrap(a, a + 0.2) == 0.0 and paired_t_test(a, a + 0.2) == 0.0
    assert paired_bootstrap(a, a) == 1.0 and paired_t_test(a, a) == 1.0
    with pytest.raises(ValueError, match="pair"):
        paired_t_test([0.1, 0.2], [0.1])


# ------------------------------------------------------------------------------------------------ the table


def _report_dir(folder: Path, name: str, tasks: dict[str, dict[str, dict[str, float]]], qrels, per_query=True) -> Path:
    """A real evaluate output (report.json, per_query.jsonl) for ``tasks``: {"bench/task": run}, scored by
    reasonembed.evaluation.metrics on ``qrels``."""
    reports, results = [], {}
    for key, run in tasks.items():
        bench, task = key.split("/")
        t = RetrievalTask(task, Corpus(["a", "b", "c"], ["x", "y", "z"]), Queries(list(qrels), list(qrels)), qrels,
                          benchmark=bench)
        res = evaluate(qrels, run)
        reports.append(task_report(t, res))
        results[key] = res
    write_report(Report(name=name, tasks=reports), folder, results=results if per_query else None, plots=False)
    return folder


QRELS = {f"q{i}": {"a": 1, "b": 0, "c": 0} for i in range(12)}


def _runs(n_right: int) -> dict[str, dict[str, float]]:
    """A run that puts the relevant doc first for the first ``n_right`` queries."""
    return {q: ({"a": 0.9, "b": 0.5} if i < n_right else {"b": 0.9, "a": 0.1}) for i, q in enumerate(QRELS)}


def test_table_blanks_references_and_p_values(tmp_path):
    """Different task sets leave blank cells; BRIGHT columns get the paper's numbers beside them; the second run's
    paired tests are against the first; a run without per-query files gets no p-value and says why."""
    one = _report_dir(tmp_path / "one", "base", {"bright/biology": _runs(4), "beir/mini": _runs(6)}, QRELS)
    two = _report_dir(tmp_path / "two", "better", {"bright/biology": _runs(11)}, QRELS)
    three = _report_dir(tmp_path / "three", "noq", {"bright/biology": _runs(5), "beir/mini": _runs(6)}, QRELS,
                        per_query=False)
    c = compare(load_runs([one, two, three]))
    assert c.columns == ["bright/biology", "beir/mini", "bright/avg"]
    base, better, noq = c.rows[:3]
    assert better.values["beir/mini"] is None and base.values["bright/avg"] is None, "12 tasks make a BRIGHT avg"
    paper = {r.label: r for r in c.rows[3:]}
    assert paper["paper: BM25 (BRIGHT's)"].values == {"bright/biology": pytest.approx(0.189),
                                                      "bright/avg": pytest.approx(0.145)}
    test = better.tests["bright/biology"]
    assert test.n == 12 and test.mean_diff == pytest.approx(better.values["bright/biology"] - base.values[
        "bright/biology"])
    assert test.p_ttest == pytest.approx(stats.ttest_rel([1.0] * 11 + [0.0], [1.0] * 4 + [0.0] * 8).pvalue)
    assert test.p_ttest < 0.05 and test.p_bootstrap < 0.05
    assert "beir/mini" not in better.tests
    assert noq.tests["beir/mini"].p_ttest is None and "no per-query file" in noq.tests["beir/mini"].note
    md = render_markdown(c)
    assert "| better | corpus | " in md and "not measured here" in md and "no p-value" in md


def test_compare_cli_errors(tmp_path, capsys):
    one = _report_dir(tmp_path / "one", "base", {"beir/mini": _runs(4)}, QRELS)
    (tmp_path / "empty").mkdir()
    assert main([str(one), str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert "empty has no report.json" in capsys.readouterr().err
    assert main([str(one), "--metric", "ndcg_at_7", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ end to end


def _cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "reasonembed.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_evaluate_pool_then_compare_cli(scifact_dir, tmp_path, minilm_path):
    """The acceptance commands on a folder evaluate has never seen: `evaluate --model minilm --protocol pool` (the
    default config: the Ray Data encode job embeds the pooled documents) matches pytrec_eval on its run file
    restricted to the pool; a BM25 pool run beside it; `compare O1 O2` prints the table and writes md/CSV/PNG."""
    folder = pool_folder(scifact_dir, tmp_path / "unseen", n_queries=30, depth=5)
    o1, o2 = tmp_path / "O1", tmp_path / "O2"
    _cli(["evaluate", "--model", "minilm", "--protocol", "pool", "--data", str(folder), "--out", str(o1)], REPO)
    _cli(["evaluate", "--retriever", "bm25", "--protocol", "pool", "--data", str(folder), "--out", str(o2)], REPO)
    report = json.loads((o1 / "report.json").read_text())
    assert report["protocol"] == "pool"
    task = report["tasks"]["beir/unseen"]
    qrels = read_qrels(folder)
    run = read_trec_run(o1 / "beir" / "unseen" / "run.trec")
    assert all(set(docs) <= set(qrels[q]) for q, docs in run.items())
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    assert math.isclose(task["metrics"]["ndcg_at_10"], np.mean([v["ndcg_cut_10"] for v in per_query.values()]),
                        abs_tol=1e-4)

    proc = _cli(["compare", str(o1), str(o2)], tmp_path, timeout=300)
    out = tmp_path / "compare"
    assert "| model | protocol | beir/unseen |" in proc.stdout and "| BM25 | pool |" in proc.stdout
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare.md").read_text() in proc.stdout
    rows = list(csv.DictReader((out / "compare.csv").open()))
    bm25 = next(r for r in rows if r["model"] == "BM25")
    assert bm25["n_paired"] == "30" and 0.0 <= float(bm25["p_ttest"]) <= 1.0 and bm25["p_bootstrap"]
