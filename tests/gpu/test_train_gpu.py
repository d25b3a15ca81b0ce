"""Redapter training on CUDA (marker ``gpu``; skipped without a GPU).

1. The per-worker training step without Ray (the lent GPU machines have torch, transformers and peft but no Ray or
   DeepSpeed): tiny Qwen3 + LoRA, bf16 autocast, gradient checkpointing, RI-InfoNCE, checkpoint, resume, export.
2. The full job with Ray Train + DeepSpeed ZeRO-1 in bf16 on one GPU worker, where Ray and DeepSpeed are installed.

The samples are written here (no shared data on the GPU machine): sentences about a few topics, each query's
positive from its topic and hard negatives from the others.

Run: ``PYTHONPATH=platform pytest tests/gpu -m gpu`` (the repository's platform/ is the source root).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

TOPICS = {
    "astronomy": ["The tilt of the Earth's axis causes the seasons.", "Jupiter is the largest planet.",
                  "A light year measures distance, not time.", "Neutron stars are remnants of supernovae."],
    "cooking": ["Searing meat creates flavour through the Maillard reaction.", "Bread rises because yeast makes CO2.",
                "Salt draws water out of vegetables.", "Emulsions such as mayonnaise need a slow drizzle of oil."],
    "math": ["n^3 - n is a product of three consecutive integers.", "The pigeonhole principle forces a collision.",
             "Fermat's little theorem underlies RSA.", "Cauchy-Schwarz bounds an inner product by the norms."],
    "medicine": ["ST elevation with raised troponin indicates infarction.", "Metformin is first-line for diabetes.",
                 "Finishing antibiotics slows resistance.", "Insulin lowers blood glucose."],
}
PROMPT = "Given a question, retrieve the passage that answers it"


def write_samples(folder: Path) -> Path:
    rows, topics = [], list(TOPICS)
    for t, topic in enumerate(topics):
        for i, passage in enumerate(TOPICS[topic]):
            others = [p for o in topics if o != topic for p in TOPICS[o]]
            rows.append({"sample_id": f"{topic}-{i}", "domain": "mixed", "prompt": PROMPT,
                         "query": f"Which {topic} fact is number {i}?",
                         "reasoning_query": f"Which {topic} fact is number {i}? It says: {passage[:30]}" if i % 2 else "",
                         "pos": [passage], "neg": others[t:t + 5], "train_group_size": 4, "batch_size": 4})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(data: Path, out: Path, **over):
    from reasonembed.config.train import TrainJobConfig

    base = {"data": {"paths": str(data)}, "out": str(out), "embedder": {"model": "tiny-qwen3", "max_length": 64},
            "loss": {"ri_start_step": 1}, "optim": {"max_steps": 2}, "checkpointing": {"every_n_steps": 2},
            "precision": "auto", **over}
    return TrainJobConfig.model_validate(base)


def test_worker_step_lora_bf16_on_cuda_without_ray(tmp_path, tiny_qwen3_path):
    from reasonembed.redapter.curves import read_rows
    from reasonembed.redapter.data import read_training_data
    from reasonembed.redapter.session import LocalSession
    from reasonembed.redapter.worker import run_worker

    data = write_samples(tmp_path / "data")
    cfg = config(data, tmp_path / "runs")
    args = {"job": cfg.model_dump(mode="json"), "table": read_training_data(cfg.data).table,
            "run_uri": str(tmp_path / "train"), "export_uri": str(tmp_path / "model"),
            "prompts": {"query": f"Instruct: {PROMPT}\nQuery: ", "document": ""}, "instruction": PROMPT}
    session = LocalSession(tmp_path / "ckpt", device="cuda")
    torch.cuda.reset_peak_memory_stats()
    out = run_worker(args, session)
    info = out["model"]
    assert info["precision"] == "bf16" and info["weights_dtype"] == "bfloat16" and info["lora"]
    assert info["gradient_checkpointing"]
    rows = read_rows(str(tmp_path / "train"))
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] is not None for r in rows)
    assert all(r["ri_active"] for r in rows[1:])
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB; rows {rows}")

    # resume on the GPU: two more steps from the step-2 checkpoint (the epoch has 4: 16 samples, 4 per step)
    more = config(data, tmp_path / "runs", optim={"max_steps": 4})
    args["job"] = more.model_dump(mode="json")
    again = run_worker(args, session)
    assert again["resumed"] and again["state"].global_step == 4
    assert [r["step"] for r in read_rows(str(tmp_path / "train"))] == [0, 1, 2, 3]

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "model"), device="cuda")
    emb = st.encode(["Which astronomy fact is number 1?"], prompt_name="query")
    assert emb.shape == (1, 128) and abs(float((emb ** 2).sum()) - 1.0) < 1e-2


def test_deepspeed_zero1_bf16_lora_ray_train(tmp_path, tiny_qwen3_path):
    pytest.importorskip("deepspeed")
    ray = pytest.importorskip("ray")
    from reasonembed.redapter.trainer import run

    data = write_samples(tmp_path / "data")
    cfg = config(data, tmp_path / "runs", strategy="deepspeed", zero_stage=1, precision="bf16",
                 scaling={"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 2, "GPU": 1}})
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        summary = run(cfg)
    finally:
        if started:
            ray.shutdown()
    assert summary["steps"] == 2 and summary["strategy"] == "deepspeed"
    assert Path(summary["model_path"], "model.safetensors").is_file()
