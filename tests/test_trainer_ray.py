"""Redapter training as a Ray Train job on CPU with 2 workers: DDP and DeepSpeed ZeRO-1, a worker killed mid-run,
a failed job submitted again, checkpoints on local disk and on S3 (moto), export, dev evaluation.

The kill is a real SIGKILL of a Ray Train worker process right after a given optimizer step (reasonembed.redapter.
faults, armed through environment variables on the driver), i.e. what an OOM kill or a lost node looks like.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_trainer import PROMPT, impliret_samples, job

from reasonembed.redapter import faults
from reasonembed.redapter.curves import read_events, read_rows
from reasonembed.redapter.state import CheckpointMismatchError
from reasonembed.redapter.trainer import TrainJobError, locations, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def samples(data_dir, tmp_path_factory) -> Path:
    # 16 queries, 2 per worker and step: 4 optimizer steps per epoch with 2 workers.
    return impliret_samples(data_dir, tmp_path_factory.mktemp("samples"))


def dev_set(data_dir: Path, out: Path, n_queries: int = 8, n_docs: int = 40) -> Path:
    """A small BEIR-layout folder cut from ImpliRet wknow (queries q16.., their posts plus neighbours)."""
    src = data_dir / "impliret" / "wknow-multispeaker"
    out.mkdir(parents=True)
    docs = [json.loads(x) for x in (src / "corpus.jsonl").read_text().splitlines()][16:16 + n_docs]
    queries = [json.loads(x) for x in (src / "queries.jsonl").read_text().splitlines()][16:16 + n_queries]
    (out / "corpus.jsonl").write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    (out / "queries.jsonl").write_text("".join(json.dumps({"id": q["id"], "text": q["text"]}) + "\n" for q in queries))
    (out / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q['id']}\td{q['id'][1:]}\t1\n"
                                                                           for q in queries))
    return out


def arm_kill(monkeypatch, tmp_path: Path, step: int, rank: int) -> Path:
    marker = tmp_path / f"killed-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(faults.ENV_STEP, str(step))
    monkeypatch.setenv(faults.ENV_RANK, str(rank))
    monkeypatch.setenv(faults.ENV_MARKER, str(marker))
    return marker


def assert_st_matches_embedder(folder: str, instruction: str) -> None:
    from sentence_transformers import SentenceTransformer

    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.models.embedder import Embedder

    queries = ["Who attended a cooking class in Peru?", "Which speaker visited the Eiffel Tower area?"]
    docs = ["2024-03-02 10:11, Ana: I finally took the ceviche course near Plaza de Armas in Cusco.",
            "We walked along the Seine and climbed the iron lattice tower at sunset."]
    st = SentenceTransformer(folder, device="cpu")
    assert st.prompts["query"] == f"Instruct: {instruction}\nQuery: " and st.prompts["document"] == ""
    emb = Embedder(EmbedderConfig(model=folder, device="cpu", query_instruction=instruction))
    # One document is longer than max_length: cut inputs must match too (tests/test_export.py covers the
    # tokenizer-appended EOS of decoder exports in detail).
    docs.append(" ".join(["The ceviche course ran long, so we stayed in Cusco for another week."] * 20))
    assert emb.token_ids_with_flags(docs)[1][-1], "the long document is not truncated"
    np.testing.assert_allclose(st.encode(queries, prompt_name="query"), emb.encode(queries, is_query=True), atol=1e-5)
    np.testing.assert_allclose(st.encode(docs), emb.encode(docs), atol=1e-5)


def test_ddp_two_workers_killed_worker_resumes_from_checkpoint(ray_local, samples, data_dir, tmp_path, monkeypatch):
    marker = arm_kill(monkeypatch, tmp_path, step=3, rank=1)  # after step 3; the newest checkpoint is step 2
    broken = tmp_path / "broken.jsonl"  # a row without positives: set aside in train/errors/, never trained on
    broken.write_text(json.dumps({"prompt": PROMPT, "query": "q", "pos": [], "neg": ["n"]}) + "\n")
    cfg = job(samples, tmp_path / "runs", model="minilm", data={"paths": [str(samples), str(broken)]},
              optim={"max_steps": 4}, scaling={"num_workers": 2}, max_failures=1,
              eval={"data": str(dev_set(data_dir, tmp_path / "dev")), "max_queries": 8})
    summary = run(cfg)

    assert marker.is_file(), "the fault was not triggered"
    where = locations(cfg)
    events = read_events(where["train"])
    assert [(e["event"], e["step"], e["attempt"]) for e in events] == [
        ("start", 0, 1), ("resume", 2, 2), ("finish", 4, 2)]
    rows = read_rows(where["train"])
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and [r["attempt"] for r in rows] == [1, 1, 2, 2]
    assert all(r["queries"] == 4 and r["passages"] == 12 for r in rows)  # global batch: 2 workers x 2 queries
    assert summary["resumed_from_steps"] == [2] and summary["attempts"] == 2 and summary["steps"] == 4
    assert summary["checkpoint"].endswith("checkpoint-00000004")
    assert Path(where["train"], "curves.png").stat().st_size > 10_000
    assert Path(where["train"], "metrics.csv").read_text().startswith("step,")
    manifest = json.loads(Path(where["train"], "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_out"] == 16 and manifest["rows_error"] == 1
    assert manifest["errors_by_reason"] == {"no_positive": 1}
    assert Path(where["train"], "errors", "part-00000.parquet").is_file()

    assert_st_matches_embedder(summary["model_path"], PROMPT)
    ev = summary["eval"]
    assert ev["trained"]["n_queries"] == 8 and ev["base"]["n_queries"] == 8
    assert 0.0 <= ev["trained"]["ndcg_at_10"] <= 1.0 and ev["trained"]["instruction"] == PROMPT


def test_deepspeed_zero1_on_s3_failed_job_resubmitted_resumes(ray_local, s3_server, samples, tmp_path,
                                                              monkeypatch):
    import pyarrow.fs as pafs

    from reasonembed.storage import resolve

    out = f"s3://reasonembed/train-{uuid.uuid4().hex[:8]}"
    cfg = job(samples, out, model="tiny-qwen3", strategy="deepspeed", zero_stage=1, optim={"max_steps": 4},
              scaling={"num_workers": 2}, max_failures=0, embedder={"max_length": 96})
    marker = arm_kill(monkeypatch, tmp_path, step=3, rank=0)
    with pytest.raises(TrainJobError, match=r"checkpoint-00000002 \(step 2\).*again resumes"):
        run(cfg)
    assert marker.is_file()
    for var in (faults.ENV_STEP, faults.ENV_RANK, faults.ENV_MARKER):
        monkeypatch.delenv(var)

    summary = run(cfg)  # the same job submitted again
    where = locations(cfg)
    assert summary["resumed_from_steps"] == [2] and summary["steps"] == 4
    events = read_events(where["train"])
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 2), ("finish", 4)]
    assert [r["step"] for r in read_rows(where["train"])] == [0, 1, 2, 3]
    fs, path = resolve(summary["checkpoint"])
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    # ZeRO-1: one optimizer partition per rank, merged into one checkpoint folder by Ray Train
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "train_state.json"} <= names

    local = tmp_path / "model"
    fs, path = resolve(summary["model_path"])
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    assert json.loads((local / "reasonembed.json").read_text())["lora"] is True
    assert_st_matches_embedder(str(local), PROMPT)

    # Another recipe on the same run: refused before any worker starts, naming the settings.
    other = job(samples, out, model="tiny-qwen3", strategy="ddp", lora={"r": 8}, optim={"max_steps": 4},
                scaling={"num_workers": 2}, embedder={"max_length": 96})
    with pytest.raises(CheckpointMismatchError, match=r"(?s)lora\.r: checkpoint 32 != config 8.*strategy"):
        run(other)
