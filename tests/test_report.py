"""Reports from real BM25 evaluations: report.json / report.md / run.trec / PNG, and the paper-style table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from reasonembed.data import load_task
from reasonembed.evaluation.bm25 import BM25Config, bm25_run
from reasonembed.evaluation.metrics import HEADLINE_METRICS, evaluate
from reasonembed.evaluation.report import (
    Report,
    load_report,
    markdown_table,
    plot_task,
    task_report,
    write_report,
)
from reasonembed.evaluation.runs import read_trec_run

SPECS = ("beir/scifact", "impliret/wknow-multispeaker", "impliret/temporal-multispeaker")


@pytest.fixture(scope="module")
def evaluated(data_dir):
    """BM25 with two settings on three real tasks (200 queries each to keep it quick)."""
    out = {}
    for label, cfg in (("BM25", BM25Config()), ("BM25 k1=0.9 b=0.4", BM25Config(k1=0.9, b=0.4))):
        tasks, runs, results = [], {}, {}
        for spec in SPECS:
            task = load_task(spec, data_dir).limit_queries(200)
            run = bm25_run(task, cfg, k=100)
            res = evaluate(task.qrels, run)
            rep = task_report(task, res, retrieval_k=100)
            tasks.append(rep)
            runs[rep.key], results[rep.key] = run, res
        out[label] = (Report(name=label, tasks=tasks, model={"retriever": "bm25s"}, config=cfg.model_dump()), runs, results)
    return out


def test_write_report_files(evaluated, tmp_path):
    report, runs, results = evaluated["BM25"]
    written = write_report(report, tmp_path, runs=runs, results=results)
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["tasks"]) == set(runs)
    sci = data["tasks"]["beir/scifact"]
    assert sci["metrics"]["ndcg_at_10"] == results["beir/scifact"].mean["ndcg_at_10"]
    assert sci["data"]["revision"].startswith("sha256:") and sci["data"]["files"]["corpus.jsonl"]
    assert sci["extra"]["retrieval_k"] == 100 and sci["n_docs"] == 5183
    assert data["config"]["k1"] == 1.5 and data["model"] == {"retriever": "bm25s"}
    means = [results[k].mean["ndcg_at_10"] for k in runs]
    assert data["averages"]["all"]["ndcg_at_10"] == pytest.approx(float(np.mean(means)))
    assert data["averages"]["impliret"]["ndcg_at_10"] == pytest.approx(float(np.mean(means[1:])))

    md = (tmp_path / "report.md").read_text()
    assert "| model | beir/scifact | impliret/wknow-multispeaker |" in md
    assert f"| {100 * means[0]:.2f} |" in md or f"| BM25 | {100 * means[0]:.2f} |" in md
    assert "## Metrics per task" in md and "data revision `sha256:" in md

    for key in runs:
        trec = tmp_path / key / "run.trec"
        assert read_trec_run(trec) == runs[key]
        per_query = (tmp_path / key / "per_query.jsonl").read_text().splitlines()
        assert len(per_query) == results[key].n_queries
        img = imread(tmp_path / key / "metrics.png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01, "the chart is not blank"
    assert written["report.json"] == tmp_path / "report.json"

    back = load_report(tmp_path)
    assert back.name == "BM25" and [t.key for t in back.tasks] == [t.key for t in report.tasks]
    assert back.averages() == report.averages()


def test_table_compares_rows(evaluated):
    a, b = evaluated["BM25"][0], evaluated["BM25 k1=0.9 b=0.4"][0]
    table = markdown_table([a, b]).splitlines()
    assert table[0].startswith("| model | beir/scifact |") and table[0].endswith("| beir avg | impliret avg | avg |")
    assert table[2].startswith("| BM25 |") and table[3].startswith("| BM25 k1=0.9 b=0.4 |")
    cells = table[2].strip("|").split("|")
    assert float(cells[1]) == pytest.approx(100 * a.tasks[0].metrics["ndcg_at_10"], abs=0.006)
    # a row missing a task shows a dash; a single benchmark has no per-benchmark average columns
    partial = Report(name="partial", tasks=b.tasks[:1])
    rows = markdown_table([a, partial]).splitlines()
    assert rows[3].count("–") == 3  # two ImpliRet tasks and the ImpliRet average
    single = markdown_table([partial]).splitlines()[0]
    assert single == "| model | scifact | avg |"


def test_plot_several_models(evaluated, tmp_path):
    entries = [(label, rep.tasks[1]) for label, (rep, _, _) in evaluated.items()]
    path = plot_task(entries, tmp_path / "cmp.png", metrics=HEADLINE_METRICS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_task([], tmp_path / "none.png")


def test_protocol_and_accuracy_at_1_in_the_report(evaluated, tmp_path):
    """report.json records the protocol (a report from before protocols existed reads as corpus), report.md says it
    on its first line, and accuracy@1 is a reported metric, per task and per query."""
    report, runs, results = evaluated["BM25"]
    pool = Report(name="BM25", tasks=report.tasks, protocol="pool")
    write_report(pool, tmp_path, results=results, plots=False)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["protocol"] == "pool" and load_report(tmp_path).protocol == "pool"
    first = (tmp_path / "report.md").read_text().splitlines()[0]
    assert first.startswith("# Evaluation: BM25 (protocol pool: ") and "qrels" in first
    assert "accuracy_at_1" in data["tasks"]["beir/scifact"]["metrics"]
    assert "accuracy_at_1" in json.loads((tmp_path / "beir/scifact/per_query.jsonl").read_text().splitlines()[0])
    del data["protocol"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    assert load_report(tmp_path).protocol == "corpus"
