"""`reasonembed evaluate`: the acceptance command forms on real data, and the published numbers (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pool_fixtures import pool_folder, scifact_slice

REPO = Path(__file__).resolve().parents[1]
KEYS = {"ndcg_at_1", "ndcg_at_5", "ndcg_at_10", "ndcg_at_100", "recall_at_10", "recall_at_100", "mrr_at_10", "map"}


def _evaluate(args: list[str], timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "reasonembed.cli", "evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _check_outputs(out: Path, task_key: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    metrics = report["tasks"][task_key]["metrics"]
    assert KEYS <= set(metrics)
    assert KEYS <= set(report["averages"]["all"])
    assert (out / "report.md").read_text().count("|") > 4
    run_lines = (out / task_key / "run.trec").read_text().splitlines()
    assert run_lines and len(run_lines[0].split()) == 6
    assert (out / task_key / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    return metrics


def test_evaluate_bm25_on_a_beir_folder(mini_scifact, tmp_path):
    out = tmp_path / "bm25"
    _evaluate(["--retriever", "bm25", "--data", str(mini_scifact), "--out", str(out)])
    metrics = _check_outputs(out, f"beir/{mini_scifact.name}")
    assert 0.5 < metrics["ndcg_at_10"] <= 1.0


def test_evaluate_reads_a_task_folder_on_s3(mini_scifact, s3_server, tmp_path):
    """`--data s3://...` goes through the job's storage settings (a real moto server) and scores exactly what the
    same folder scores locally."""
    from reasonembed.config.base import StorageConfig
    from reasonembed.storage import Location

    dest = Location("s3://reasonembed/eval-input/mini", StorageConfig(s3_endpoint=s3_server))
    for f in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        dest.upload_file(mini_scifact / f, f)
    local, remote = tmp_path / "local", tmp_path / "s3"
    _evaluate(["--retriever", "bm25", "--data", str(mini_scifact), "--out", str(local)])
    _evaluate(["--retriever", "bm25", "--data", "s3://reasonembed/eval-input/mini", "--out", str(remote)])
    want = json.loads((local / "report.json").read_text())["tasks"]
    got = json.loads((remote / "report.json").read_text())["tasks"]
    assert len(got) == 1 and len(want) == 1
    (w,), (g,) = want.values(), got.values()
    assert g["metrics"] == w["metrics"] and g["n_queries"] == w["n_queries"] == 40


def test_evaluate_rejects_missing_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reasonembed.cli", "evaluate", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "none" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.acceptance
def test_minilm_scifact_matches_mteb(scifact_dir, tmp_path):
    """The acceptance form ``reasonembed evaluate --model minilm --data <BEIR dir> --out <dir>`` on full BEIR SciFact,
    through the Ray Data encode job: every output is written and nDCG@10 = 0.645 ± 0.005 (MTEB 0.64508)."""
    out = tmp_path / "scifact"
    _evaluate(["--model", "minilm", "--data", str(scifact_dir), "--out", str(out)], timeout=3000)
    metrics = _check_outputs(out, "beir/scifact")
    assert abs(metrics["ndcg_at_10"] - 0.64508) <= 0.005, metrics["ndcg_at_10"]


def _r2med_folder(scifact_dir: Path, root: Path, n_queries: int = 6) -> Path:
    """An R2MED task folder in R2MED's release layout (``r2med/Biology/{corpus,query}.jsonl`` + ``qrels.txt`` with a
    score column) from real SciFact text. Each relevant abstract is followed by the next ones until the document
    holds ~6000 characters: well over 512 tokens, well under 8192."""
    queries, qrels, docs = scifact_slice(scifact_dir, n_queries)
    at = {d["id"]: i for i, d in enumerate(docs)}
    wanted = [d for q in queries for d in qrels[q["id"]]]
    corpus = []
    for did in list(dict.fromkeys(wanted)) + [docs[i]["id"] for i in range(8)]:
        text, i = docs[at[did]]["text"], at[did]
        while len(text) < 6000:
            i += 1
            text += " " + docs[i % len(docs)]["text"]
        corpus.append({"id": did, "text": text})
    folder = root / "r2med" / "Biology"
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "query.jsonl").write_text("".join(json.dumps({"id": q["id"], "text": q["text"]}) + "\n"
                                                for q in queries))
    (folder / "qrels.txt").write_text("q_id p_id score\n" + "".join(f"{q['id']} {d} 1\n" for q in queries
                                                                    for d in qrels[q["id"]]))
    return root


def test_r2med_is_encoded_at_its_own_max_length(scifact_dir, mini_scifact, tmp_path, tiny_qwen3_path):
    """A long-context embedder (8192, like the paper preset) evaluates R2MED at R2MED's 512 and a BEIR folder at the
    embedder's 8192 in the same run; an explicit run-level max_length wins over both. report.json says which."""
    from reasonembed.config.evaluate import EvaluateJobConfig
    from reasonembed.evaluation.pipeline import run

    root = _r2med_folder(scifact_dir, tmp_path / "data")
    base = {"tasks": ["r2med/Biology", str(mini_scifact)], "data_dir": str(root), "corpus_encoding": "local",
            "embedder": {"model": "tiny-qwen3", "max_length": 8192, "device": "cpu"}, "max_queries": 4,
            "plots": False}
    cfg = EvaluateJobConfig.model_validate({**base, "out": str(tmp_path / "protocol")})
    tasks = json.loads(Path(run(cfg)["report"]).read_text())["tasks"]
    r2med, beir = tasks["r2med/Biology"]["extra"], tasks[f"beir/{mini_scifact.name}"]["extra"]
    assert r2med["truncated"] == tasks["r2med/Biology"]["n_docs"]  # every ~6000-character document is cut at 512
    assert (r2med["max_length"], r2med["max_length_source"]) == (512, "task")
    assert (beir["max_length"], beir["max_length_source"]) == (8192, "embedder") and beir["truncated"] == 0

    cfg = EvaluateJobConfig.model_validate({**base, "tasks": ["r2med/Biology"], "max_length": 8192,
                                            "out": str(tmp_path / "override")})
    r2med = json.loads(Path(run(cfg)["report"]).read_text())["tasks"]["r2med/Biology"]["extra"]
    assert (r2med["max_length"], r2med["max_length_source"], r2med["truncated"]) == (8192, "config", 0)


def test_per_query_instructions_are_used_and_reported(scifact_dir, tmp_path, minilm_path):
    """Queries whose records carry an ``instruction`` are embedded with it (in the model's instruction format), the
    others with the fallback (here none); report.json says so and counts them. Checked against embeddings made here
    with Embedder.format_queries' format, on a pool folder (the pool protocol keeps the encode small)."""

    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.config.evaluate import EvaluateJobConfig
    from reasonembed.data import load_task
    from reasonembed.evaluation.pipeline import run
    from reasonembed.evaluation.runs import read_trec_run
    from reasonembed.models.embedder import Embedder

    folder = pool_folder(scifact_dir, tmp_path / "instructed", n_queries=12, depth=5)
    own = {0: "Retrieve the abstract that supports or refutes the claim", 3: "Find evidence for this claim"}
    records = [json.loads(x) for x in (folder / "queries.jsonl").read_text().splitlines()]
    for i, instruction in own.items():
        records[i]["instruction"] = instruction
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    cfg = EvaluateJobConfig.model_validate({"tasks": [str(folder)], "out": str(tmp_path / "o"), "protocol": "pool",
                                            "corpus_encoding": "local", "plots": False,
                                            "embedder": {"model": "minilm", "device": "cpu"}})
    report = json.loads(Path(run(cfg)["report"]).read_text())["tasks"]["beir/instructed"]["extra"]
    assert report["instruction_source"] == "per-query" and report["queries_with_own_instruction"] == 2
    assert report["instruction_source_other_queries"] == "none"

    trec = read_trec_run(tmp_path / "o" / "beir" / "instructed" / "run.trec")
    task = load_task(str(folder))
    embedder = Embedder(EmbedderConfig(model="minilm", device="cpu"))
    text_of = dict(zip(task.corpus.ids, task.corpus.texts, strict=True))
    for i in (0, 1, 3):
        qid = task.queries.ids[i]
        docs = sorted(trec[qid])
        q = embedder.encode([task.queries.texts[i]], is_query=True, instruction=own.get(i))[0]
        expected = embedder.encode([text_of[d] for d in docs]) @ q
        assert np.allclose([trec[qid][d] for d in docs], expected, atol=1e-5), f"query {i}"
    # The instruction changes the scores: a run that ignored it would not pass the check above.
    plain = embedder.encode([text_of[d] for d in sorted(trec[task.queries.ids[0]])]) @ embedder.encode(
        [task.queries.texts[0]], is_query=True)[0]
    assert not np.allclose(plain, [trec[task.queries.ids[0]][d] for d in sorted(trec[task.queries.ids[0]])],
                           atol=1e-3)
