"""Acceptance benchmark of Redapter training on CPU: all-MiniLM-L6-v2 on ImpliRet wknow-multispeaker.

    python bench/train.py [--epochs 2] [--batch 16] [--group 4] [--max-length 128] [--workers 1]

1. Split the 1,500 queries: numeric id suffix < 1000 train, the other 500 evaluate; the corpus is all 1,500 posts.
2. Mine hard negatives with the platform's own path (base ``Embedder`` + exact ``SearchIndex``, the positive
   excluded): the top ``group - 1`` non-relevant posts of each training query.
3. Fine-tune with ``reasonembed.redapter.trainer.run`` (Ray Train; RI-InfoNCE, which is basic InfoNCE here because
   ImpliRet has no reasoning queries) and, in the same process, with sentence-transformers'
   ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` on the same rows, epochs, batch size, learning
   rate, schedule, sequence length and temperature (MNRL scale = 1 / τ).
4. Evaluate base, ours and theirs on the 500 held-out queries over the full corpus with the same encoder path
   (nDCG@10, trec_eval conventions) and print training samples/s (queries per second of training steps, start-up
   excluded) and the end-to-end wall time of both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("REASONEMBED_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=2,
                   help="passes over the 1,000 training queries (1 epoch measured +0.004 nDCG@10 over base: too few)")
    p.add_argument("--batch", type=int, default=16, help="queries per step (global)")
    p.add_argument("--group", type=int, default=4, help="passages per query: 1 positive + group-1 mined negatives")
    p.add_argument("--max-length", type=int, default=256, help="MiniLM's own limit; ImpliRet posts are ~170 tokens")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (the batch is split across them)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (ours: per worker)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--skip-st", action="store_true", help="skip the sentence-transformers baseline")
    p.add_argument("--limit-train", type=int, default=None, help="smoke runs: first N training queries only")
    p.add_argument("--limit-test", type=int, default=None, help="smoke runs: first N test queries only")
    return p.parse_args()


def split_ids(task) -> tuple[list[str], list[str]]:
    train = [q for q in task.queries.ids if int(q.lstrip("q")) < 1000]
    test = [q for q in task.queries.ids if int(q.lstrip("q")) >= 1000]
    return train, test


def evaluate(model: str, task, qids, max_length: int, threads: int) -> dict:
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.models.embedder import Embedder
    from reasonembed.redapter.dev_eval import retrieval_metrics

    emb = Embedder(EmbedderConfig(model=model, pooling="mean", max_length=max_length, device="cpu",
                                  num_threads=threads))
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    return retrieval_metrics(emb, task, qids, [texts[q] for q in qids], k=100)


def train_ours(args, data_dir: Path, work: Path) -> tuple[str, dict, float]:
    from reasonembed.config.train import TrainJobConfig
    from reasonembed.redapter.trainer import run

    per_worker = args.batch // args.workers
    cfg = TrainJobConfig.model_validate({
        "run_id": "bench-impliret", "out": str(work / "ours"), "seed": 42,
        "ray": {"num_cpus": max(2, args.workers * args.threads), "object_store_memory_mb": 256},
        "data": {"paths": [str(data_dir)], "batch_size": per_worker, "train_group_size": args.group},
        "embedder": {"model": "minilm", "pooling": "mean", "max_length": args.max_length},
        "lora": {"enabled": False},
        "loss": {"temperature": args.temperature},
        "optim": {"lr": args.lr, "warmup_ratio": 0.1, "epochs": args.epochs, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "strategy": "ddp", "precision": "fp32",
        "scaling": {"num_workers": args.workers, "resources_per_worker": {"CPU": args.threads}},
        "checkpointing": {"every_n_steps": 10_000, "num_to_keep": 1},
        "log": {"every_n_steps": 10, "flush_every_n_steps": 50},
    })
    t0 = time.time()
    summary = run(cfg)
    return summary["model_path"], summary, time.time() - t0


def train_st(args, rows: list[dict], work: Path) -> tuple[str, dict, float]:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from reasonembed.models.registry import resolve_model

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = SentenceTransformer(str(resolve_model("minilm").path), device="cpu")
    model.max_seq_length = args.max_length
    cols: dict[str, list[str]] = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
    for k in range(args.group - 1):
        cols[f"negative_{k + 1}"] = [r["neg"][k] for r in rows]
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st-out"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        dataloader_drop_last=True, save_strategy="no", report_to="none", logging_steps=10, seed=42,
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(cols), loss=loss)
    out = trainer.train()
    path = str(work / "st-model")
    model.save(path)
    return path, dict(out.metrics), time.time() - t0


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO / "platform"))
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.data.beir import load_beir_folder
    from reasonembed.models.embedder import Embedder
    from reasonembed.redapter.samples import mine_negatives, samples_from_task, write_jsonl

    work = Path(args.out or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    task = load_beir_folder(Path(args.data_dir) / "impliret" / "wknow-multispeaker", benchmark="impliret")
    train_q, test_q = split_ids(task)
    train_q, test_q = train_q[:args.limit_train], test_q[:args.limit_test]
    print(f"ImpliRet wknow-multispeaker: {len(task.corpus)} docs, {len(train_q)} train / {len(test_q)} test queries")

    t0 = time.time()
    base = Embedder(EmbedderConfig(model="minilm", pooling="mean", max_length=args.max_length, device="cpu",
                                   num_threads=args.threads))
    docs = base.encode(task.corpus.texts)
    negatives = mine_negatives(base, task, train_q, n_neg=args.group - 1, doc_embeddings=docs)
    rows = samples_from_task(task, train_q, negatives, domain="impliret-wknow")
    data_dir = write_jsonl(rows, work / "samples" / "impliret-wknow.jsonl").parent
    print(f"mined {args.group - 1} hard negatives for {len(rows)} training queries in {time.time() - t0:.1f} s")
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    from reasonembed.redapter.dev_eval import retrieval_metrics

    results = {"base": retrieval_metrics(base, task, test_q, [texts[q] for q in test_q], doc_embeddings=docs)}
    del base

    ours_path, ours, ours_wall = train_ours(args, data_dir, work)
    results["ours"] = evaluate(ours_path, task, test_q, args.max_length, args.threads)
    speed = {"ours": {"samples_per_s": ours["samples_per_s"], "train_s": ours["train_s"], "wall_s": ours_wall,
                      "steps": ours["steps"]}}
    if not args.skip_st:
        st_path, st, st_wall = train_st(args, rows, work)
        results["sentence-transformers"] = evaluate(st_path, task, test_q, args.max_length, args.threads)
        speed["sentence-transformers"] = {"samples_per_s": st["train_samples_per_second"],
                                          "train_s": st["train_runtime"], "wall_s": st_wall,
                                          "steps": st.get("global_step")}

    print(f"\nsettings: epochs {args.epochs}, batch {args.batch} queries x group {args.group}, max length "
          f"{args.max_length}, lr {args.lr}, tau {args.temperature}, {args.workers} Ray worker(s), "
          f"{args.threads} threads")
    print(f"{'model':<24}{'nDCG@10':>9}{'R@10':>8}{'MRR@10':>8}{'samples/s':>11}{'train s':>9}{'wall s':>8}")
    for name, m in results.items():
        s = speed.get(name, {})
        sps = f"{s['samples_per_s']:.2f}" if s.get("samples_per_s") else "-"
        tr = f"{s['train_s']:.0f}" if s.get("train_s") else "-"
        wall = f"{s['wall_s']:.0f}" if s.get("wall_s") else "-"
        print(f"{name:<24}{m['ndcg_at_10']:>9.4f}{m['recall_at_10']:>8.4f}{m['mrr_at_10']:>8.4f}{sps:>11}{tr:>9}"
              f"{wall:>8}")
    if "sentence-transformers" in results:
        ratio = speed["ours"]["samples_per_s"] / speed["sentence-transformers"]["samples_per_s"]
        d = results["ours"]["ndcg_at_10"] - results["sentence-transformers"]["ndcg_at_10"]
        print(f"ours / sentence-transformers: training speed {ratio:.2f}x, nDCG@10 {d:+.4f}")
    print(f"fine-tuned vs base nDCG@10: {results['ours']['ndcg_at_10'] - results['base']['ndcg_at_10']:+.4f}")
    (work / "results.json").write_text(json.dumps({"args": vars(args), "metrics": results, "speed": speed},
                                                  indent=2, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
