"""Acceptance benchmark of Redapter training on CPU: all-MiniLM-L6-v2 on ImpliRet wknow-multispeaker.

    python bench/train.py [--epochs 2] [--batch 16] [--group 4] [--max-length 256] [--seeds 42,43,44]
    python bench/train.py --check-parity      # the controlled check only (seconds)
    python bench/train.py --limit-train 320 --epochs 3 --max-length 128 --limit-test 250 --seeds 1 \
        --no-dropout --st-order ours --st-loss ours  # the deterministic whole-run check (about 12 minutes)

1. Split the 1,500 queries: numeric id suffix < 1000 train, the other 500 evaluate; the corpus is all 1,500 posts.
2. Mine hard negatives with the platform's own path (base ``Embedder`` + exact ``SearchIndex``, the positive
   excluded): the top ``group - 1`` non-relevant posts of each training query.
3. For each seed, fine-tune twice, each trainer in a fresh Python process with the same torch threads:
   ``reasonembed.redapter.trainer.run`` (Ray Train, 1 worker; RI-InfoNCE, which is basic InfoNCE here because
   ImpliRet has no reasoning queries), and sentence-transformers' ``SentenceTransformerTrainer`` +
   ``MultipleNegativesRankingLoss`` on the same rows, epochs, batch size, learning rate, schedule, sequence length and
   temperature (MNRL scale = 1 / τ). The seed drives both trainers' shuffling, negative order and dropout.
4. Evaluate base and every trained model on the 500 held-out queries over the full corpus with the same encoder path
   (nDCG@10, trec_eval conventions). Print per-seed rows, then mean and standard deviation per trainer, training
   samples/s and the CPU cores the machine was busy with while each trainer trained (from /proc/stat, so Ray's worker
   processes count too; run it on an otherwise idle machine).

``--check-parity`` is the controlled check behind the comparison: on one identical batch and identical weights (eval
mode) both losses must agree, and both trainers' optimizers must see the same parameters, learning-rate schedule,
dropout and attention kernel.

``--no-dropout --st-order ours --st-loss ours`` is the whole-run check: both trainers start from a copy of MiniLM with
dropout 0, the sentence-transformers trainer gets our exact batches and our loss, so nothing random is left and the
two runs must end at the same weights. When both trainers ran for a seed, the distance between their trained
weights (max |Δθ| and ‖Δθ‖ / ‖θ‖) is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("ours", "sentence-transformers")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("REASONEMBED_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=2,
                   help="passes over the 1,000 training queries (1 epoch measured +0.004 nDCG@10 over base: too few)")
    p.add_argument("--batch", type=int, default=16, help="queries per step (global)")
    p.add_argument("--group", type=int, default=4, help="passages per query: 1 positive + group-1 mined negatives")
    p.add_argument("--max-length", type=int, default=256, help="MiniLM's own limit; ImpliRet posts are ~170 tokens")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each trainer process (ours: its worker)")
    p.add_argument("--seeds", default="42", help="comma-separated seeds; each runs both trainers")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--skip-st", action="store_true", help="skip the sentence-transformers baseline")
    p.add_argument("--skip-ours", action="store_true", help="run only the sentence-transformers baseline")
    p.add_argument("--limit-train", type=int, default=None, help="smoke runs: first N training queries only")
    p.add_argument("--limit-test", type=int, default=None, help="smoke runs: first N test queries only")
    p.add_argument("--check-parity", action="store_true", help="run only the controlled loss/optimizer check")
    p.add_argument("--st-batch-sampler", choices=("batch_sampler", "no_duplicates"), default="batch_sampler",
                   help="sentence-transformers' batch sampler (no_duplicates: no text twice in a batch, which the "
                   "sentence-transformers docs recommend for MultipleNegativesRankingLoss)")
    p.add_argument("--st-loss", choices=("mnrl", "ours"), default="mnrl",
                   help="controlled check: the sentence-transformers trainer with our RIInfoNCELoss instead of MNRL")
    p.add_argument("--st-order", choices=("random", "ours"), default="random",
                   help="controlled check: the sentence-transformers trainer fed our trainer's exact batches "
                   "(BatchPlanner schedule of the same seed) instead of its RandomSampler")
    p.add_argument("--no-dropout", action="store_true",
                   help="controlled check: both trainers start from a copy of MiniLM with dropout 0 (hidden and "
                   "attention), so with --st-order ours and --st-loss ours their runs are deterministic and comparable "
                   "step for step")
    p.add_argument("--base-model", default="minilm", help=argparse.SUPPRESS)  # set by --no-dropout for the workers
    p.add_argument("--worker", choices=TRAINERS, default=None, help=argparse.SUPPRESS)  # one trainer, one process
    p.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def split_ids(task) -> tuple[list[str], list[str]]:
    train = [q for q in task.queries.ids if int(q.lstrip("q")) < 1000]
    test = [q for q in task.queries.ids if int(q.lstrip("q")) >= 1000]
    return train, test


def load_task(args):
    from reasonembed.data.beir import load_beir_folder

    task = load_beir_folder(Path(args.data_dir) / "impliret" / "wknow-multispeaker", benchmark="impliret")
    train_q, test_q = split_ids(task)
    return task, train_q[:args.limit_train], test_q[:args.limit_test]


def evaluate(model: str, task, qids, max_length: int, threads: int) -> dict:
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.models.embedder import Embedder
    from reasonembed.redapter.dev_eval import retrieval_metrics

    emb = Embedder(EmbedderConfig(model=model, pooling="mean", max_length=max_length, device="cpu",
                                  num_threads=threads))
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    return retrieval_metrics(emb, task, qids, [texts[q] for q in qids], k=100)


class BusyCores:
    """Average number of busy CPU cores of the whole machine between enter and exit (/proc/stat jiffies)."""

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.busy0, self.t0 = self._read()[0], time.time()
        return self

    def __exit__(self, *exc):
        busy, hz = self._read()
        self.cores = (busy - self.busy0) / hz / max(1e-9, time.time() - self.t0)
        return False


def train_ours(args, data_dir: Path, work: Path) -> tuple[str, dict]:
    from reasonembed.config.train import TrainJobConfig
    from reasonembed.redapter.trainer import run

    cfg = TrainJobConfig.model_validate({
        "run_id": f"bench-impliret-{args.seed}", "out": str(work / "ours"), "seed": args.seed,
        "ray": {"num_cpus": max(2, args.threads), "object_store_memory_mb": 256},
        "data": {"paths": [str(data_dir)], "batch_size": args.batch, "train_group_size": args.group},
        "embedder": {"model": args.base_model, "pooling": "mean", "max_length": args.max_length},
        "lora": {"enabled": False},
        "loss": {"temperature": args.temperature},
        "optim": {"lr": args.lr, "warmup_ratio": 0.1, "epochs": args.epochs, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "strategy": "ddp", "precision": "fp32",
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": args.threads}},
        "checkpointing": {"every_n_steps": 10_000, "num_to_keep": 1},
        "log": {"every_n_steps": 10, "flush_every_n_steps": 50},
    })
    with BusyCores() as cpu:
        summary = run(cfg)
    return summary["model_path"], {"samples_per_s": summary["samples_per_s"], "train_s": summary["train_s"],
                                   "steps": summary["steps"], "busy_cores": cpu.cores}


def st_arguments(args, work: Path):
    from sentence_transformers import SentenceTransformerTrainingArguments

    return SentenceTransformerTrainingArguments(
        output_dir=str(work / "st-out"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        dataloader_drop_last=True, save_strategy="no", report_to="none", logging_steps=10, seed=args.seed,
        data_seed=args.seed, use_cpu=True, batch_sampler=args.st_batch_sampler,
    )


def st_columns(rows: list[dict], group: int) -> dict[str, list[str]]:
    cols: dict[str, list[str]] = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
    for k in range(group - 1):
        cols[f"negative_{k + 1}"] = [r["neg"][k] for r in rows]
    return cols


class OurLossInST:
    """Our RIInfoNCELoss as a sentence-transformers loss (controlled check ``--st-loss ours``): the trainer's
    features are [anchor, positive, negative_1 .. negative_{G-1}]; passages go to the loss laid out per query as
    [pos, neg_1 ...], the layout RIInfoNCELoss expects (no reasoning queries: basic InfoNCE)."""

    def __new__(cls, model, temperature: float):
        import torch

        from reasonembed.redapter.loss import LossConfig, RIInfoNCELoss

        class _Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model
                self.loss = RIInfoNCELoss(LossConfig(temperature=temperature, use_ri=False, cross_device=False))

            def forward(self, sentence_features, labels=None):
                embs = [self.model(f)["sentence_embedding"] for f in sentence_features]
                passages = torch.stack(embs[1:], dim=1).reshape(-1, embs[0].size(1))
                return self.loss(embs[0], passages).loss

        return _Loss()


def our_order_sampler(args, rows: list[dict], samples_dir: Path):
    """A sentence-transformers batch sampler that yields, epoch by epoch, the rows of our trainer's own schedule
    (``BatchPlanner`` with the same seed, batch size and data), mapped to the dataset's row positions by sample id
    (controlled check ``--st-order ours``)."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    from reasonembed.redapter.batching import BatchPlanner
    from reasonembed.redapter.data import TrainDataConfig, read_training_data

    cfg = TrainDataConfig(paths=[str(samples_dir)], batch_size=args.batch, train_group_size=args.group)
    data = read_training_data(cfg, seed=args.seed)
    planner = BatchPlanner(data, cfg, seed=args.seed)
    position = {r["sample_id"]: i for i, r in enumerate(rows)}
    ids = data.table["sample_id"].to_pylist()

    class OurOrder(DefaultBatchSampler):
        def __iter__(self):
            for batch in planner.schedule(self.epoch)[0]:
                yield [position[ids[r]] for r in batch.rows.tolist()]

        def __len__(self) -> int:
            return planner.steps_per_epoch()

    return OurOrder


def train_st(args, rows: list[dict], work: Path) -> tuple[str, dict]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from reasonembed.models.registry import resolve_model

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(resolve_model(args.base_model).path), device="cpu")
    model.max_seq_length = args.max_length
    if args.st_loss == "ours":
        loss = OurLossInST(model, args.temperature)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    st_args = st_arguments(args, work)
    if args.st_order == "ours":
        st_args.batch_sampler = our_order_sampler(args, rows, work.parent / "samples")
    trainer = SentenceTransformerTrainer(model=model, args=st_args,
                                         train_dataset=Dataset.from_dict(st_columns(rows, args.group)), loss=loss)
    with BusyCores() as cpu:
        out = trainer.train()
    path = str(work / "st-model")
    model.save(path)
    m = out.metrics
    return path, {"samples_per_s": m["train_samples_per_second"], "train_s": m["train_runtime"],
                  "steps": out.global_step, "busy_cores": cpu.cores}


def worker(args) -> None:
    """One trainer in this (fresh) process; prints one JSON line with its metrics and speed."""
    work = Path(args.out)
    task, _, test_q = load_task(args)
    t0 = time.time()
    if args.worker == "ours":
        path, speed = train_ours(args, work / "samples", work / f"ours-{args.seed}")
    else:
        rows = [json.loads(x) for x in (work / "samples" / "impliret-wknow.jsonl").read_text().splitlines()]
        path, speed = train_st(args, rows, work / f"st-{args.seed}")
    speed["wall_s"] = time.time() - t0
    metrics = evaluate(path, task, test_q, args.max_length, args.threads)
    print("RESULT " + json.dumps({"trainer": args.worker, "seed": args.seed, "metrics": metrics, "speed": speed,
                                  "model_path": str(path)}))


def check_parity(args) -> None:
    """The controlled check: same batch, same weights, eval mode -> same loss; same optimizer set-up."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.models.embedder import Embedder
    from reasonembed.models.registry import resolve_model
    from reasonembed.redapter.loss import LossConfig, RIInfoNCELoss
    from reasonembed.redapter.strategies import lr_lambda, param_groups

    torch.set_num_threads(args.threads)
    task, _, _ = load_task(args)
    b, g, docs = args.batch, args.group, task.corpus.texts
    rows = [{"query": task.queries.texts[i], "pos": [docs[i]], "neg": [docs[100 + (g - 1) * i + k] for k in range(g - 1)]}
            for i in range(b)]
    st = SentenceTransformer(str(resolve_model("minilm").path), device="cpu").eval()
    st.max_seq_length = args.max_length
    mnrl = MultipleNegativesRankingLoss(st, scale=1.0 / args.temperature)
    cols = st_columns(rows, g)
    ours_emb = Embedder(EmbedderConfig(model="minilm", pooling="mean", max_length=args.max_length, device="cpu"))
    ours_emb.model.eval()
    passages = [t for r in rows for t in (r["pos"][0], *r["neg"])]
    with torch.no_grad():
        st_loss = mnrl([st.tokenize(cols[c]) for c in cols], None).item()
        q = ours_emb.embed_batch(ours_emb.tokenize(cols["anchor"]))
        p = ours_emb.embed_batch(ours_emb.tokenize(passages))
        st_q = st.encode(cols["anchor"], convert_to_tensor=True, normalize_embeddings=True)
    ours_loss = RIInfoNCELoss(LossConfig(temperature=args.temperature, use_ri=False, cross_device=False))(q, p).value
    print(f"same batch ({b} queries x group {g}), same weights, eval mode: MNRL {st_loss:.6f}, ours {ours_loss:.6f}; "
          f"max |query embedding difference| {(q - st_q).abs().max().item():.1e}")
    trainer = SentenceTransformerTrainer(model=st, args=st_arguments(args, Path(tempfile.mkdtemp())),
                                         train_dataset=Dataset.from_dict(cols), loss=mnrl)
    total = 124
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    st_lr = []
    for _ in range(total):
        st_lr.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    fn = lr_lambda(total, 0.1, "linear")
    gap = max(abs(st_lr[i] - args.lr * fn(i)) for i in range(total))
    st_params = sum(p.numel() for grp in trainer.optimizer.param_groups for p in grp["params"])
    ours_params = sum(p.numel() for grp in param_groups(ours_emb.model, 0.0) for p in grp["params"])
    cfg_st, cfg_ours = st[0].auto_model.config, ours_emb.model.config
    print(f"learning rate over {total} steps: max |ST - ours| = {gap:.1e}; optimizer parameters: ST {st_params:,}, "
          f"ours {ours_params:,} (difference: BERT's pooler, unused by mean pooling: it gets no gradient)")
    print(f"dropout hidden/attention: ST {cfg_st.hidden_dropout_prob}/{cfg_st.attention_probs_dropout_prob}, ours "
          f"{cfg_ours.hidden_dropout_prob}/{cfg_ours.attention_probs_dropout_prob}; attention: ST "
          f"{cfg_st._attn_implementation}, ours {cfg_ours._attn_implementation}; ST batch sampler "
          f"{trainer.args.batch_sampler}")


def prepare(args, work: Path) -> dict:
    """Mine negatives once with the base model, write the shared training rows; returns base metrics."""
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.models.embedder import Embedder
    from reasonembed.redapter.dev_eval import retrieval_metrics
    from reasonembed.redapter.samples import mine_negatives, samples_from_task, write_jsonl

    task, train_q, test_q = load_task(args)
    print(f"ImpliRet wknow-multispeaker: {len(task.corpus)} docs, {len(train_q)} train / {len(test_q)} test queries")
    t0 = time.time()
    base = Embedder(EmbedderConfig(model="minilm", pooling="mean", max_length=args.max_length, device="cpu",
                                   num_threads=args.threads))
    docs = base.encode(task.corpus.texts)
    negatives = mine_negatives(base, task, train_q, n_neg=args.group - 1, doc_embeddings=docs)
    rows = samples_from_task(task, train_q, negatives, domain="impliret-wknow")
    write_jsonl(rows, work / "samples" / "impliret-wknow.jsonl")
    print(f"mined {args.group - 1} hard negatives for {len(rows)} training queries in {time.time() - t0:.1f} s")
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    return retrieval_metrics(base, task, test_q, [texts[q] for q in test_q], doc_embeddings=docs)


def run_worker(args, trainer: str, seed: int, work: Path) -> dict:
    """Run one trainer in a fresh process; its RESULT line."""
    argv = [sys.executable, __file__, "--worker", trainer, "--seed", str(seed), "--out", str(work)]
    for flag in ("data_dir", "base_model", "epochs", "batch", "group", "max_length", "lr", "temperature", "threads",
                 "limit_train", "limit_test", "st_batch_sampler", "st_loss", "st_order"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{trainer} (seed {seed}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def no_dropout_copy(work: Path) -> str:
    """A copy of the built-in MiniLM folder whose config has hidden and attention dropout 0 (weights linked)."""
    from reasonembed.models.registry import resolve_model

    src, dst = resolve_model("minilm").path, work.resolve() / "minilm-no-dropout"
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif f.name == "config.json" and f.parent == src:
            cfg = json.loads(f.read_text())
            cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(cfg, indent=2))
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    return str(dst)


def weight_gap(path_a: str, path_b: str) -> dict[str, float]:
    """How far two trained copies of the same architecture ended apart: max |Δθ| and ‖Δθ‖ / ‖θ_a‖ over the
    transformer's parameters (BERT's pooler excluded: mean pooling never trains it)."""
    import torch
    from transformers import AutoModel

    a = AutoModel.from_pretrained(path_a).state_dict()
    b = AutoModel.from_pretrained(path_b).state_dict()
    keys = [k for k in a if not k.startswith("pooler.") and a[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    ref = torch.cat([a[k].flatten() for k in keys])
    return {"max_abs": float(diff.abs().max()), "relative_l2": float(diff.norm() / ref.norm())}


def summarize(args, base: dict, results: list[dict]) -> None:
    print(f"\nsettings: epochs {args.epochs}, batch {args.batch} queries x group {args.group}, max length "
          f"{args.max_length}, lr {args.lr}, tau {args.temperature}, {args.threads} threads per trainer process")
    print(f"{'model':<24}{'seed':>6}{'nDCG@10':>9}{'R@10':>8}{'MRR@10':>8}{'samples/s':>11}{'train s':>9}"
          f"{'busy cores':>12}")
    print(f"{'base':<24}{'-':>6}{base['ndcg_at_10']:>9.4f}{base['recall_at_10']:>8.4f}{base['mrr_at_10']:>8.4f}")
    for r in results:
        m, s = r["metrics"], r["speed"]
        print(f"{r['trainer']:<24}{r['seed']:>6}{m['ndcg_at_10']:>9.4f}{m['recall_at_10']:>8.4f}{m['mrr_at_10']:>8.4f}"
              f"{s['samples_per_s']:>11.2f}{s['train_s']:>9.0f}{s['busy_cores']:>12.2f}")
    for name in TRAINERS:
        mine = [r for r in results if r["trainer"] == name]
        if not mine:
            continue
        nd = [r["metrics"]["ndcg_at_10"] for r in mine]
        sps = [r["speed"]["samples_per_s"] for r in mine]
        sd = statistics.stdev(nd) if len(nd) > 1 else 0.0
        print(f"{name}: nDCG@10 mean {statistics.mean(nd):.4f} sd {sd:.4f} over {len(nd)} seed(s); samples/s mean "
              f"{statistics.mean(sps):.2f}")


def main() -> None:
    args = parse()
    if args.worker:
        return worker(args)
    if args.check_parity:
        return check_parity(args)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out = str(work)
    if args.no_dropout:
        args.base_model = no_dropout_copy(work)
    base = prepare(args, work)
    results = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for trainer in [t for t in TRAINERS if not (args.skip_st and t != "ours" or args.skip_ours and t == "ours")]:
            results.append(run_worker(args, trainer, seed, work))
            r = results[-1]
            print(f"  {trainer} seed {seed}: nDCG@10 {r['metrics']['ndcg_at_10']:.4f}, "
                  f"{r['speed']['samples_per_s']:.2f} samples/s, {r['speed']['busy_cores']:.2f} busy cores")
    summarize(args, base, results)
    for seed in sorted({r["seed"] for r in results}):
        pair = {r["trainer"]: r for r in results if r["seed"] == seed}
        if len(pair) == 2:
            gap = weight_gap(pair["ours"]["model_path"], pair["sentence-transformers"]["model_path"])
            pair["ours"]["weight_gap_to_st"] = gap
            print(f"seed {seed}: trained weights, ours vs sentence-transformers: max |Δθ| {gap['max_abs']:.2e}, "
                  f"‖Δθ‖/‖θ‖ {gap['relative_l2']:.2e}")
    (work / "results.json").write_text(json.dumps({"args": vars(args), "base": base, "runs": results}, indent=2))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
