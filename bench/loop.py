"""The whole loop, measured: synthesize from SciFact -> train all-MiniLM-L6-v2 -> evaluate base and trained on SciFact.

    python bench/loop.py [--sources 6] [--steps 20] [--generator smollm2-135m] [--out runs/bench/loop]

1. ``reasonembed synthesize`` with ``configs/synthesize/local-tiny.yaml`` (SmolLM2-135M by default) over SciFact
   documents that are not relevant to any SciFact test query: the preset's decontamination step drops every
   document judged in the test qrels before sampling ``--sources`` source documents, and mining searches only that
   decontaminated pool, so no test-relevant document becomes a positive or a negative.
2. ``reasonembed train`` (``configs/train/local-tiny.yaml``: RI-InfoNCE, Ray Train DDP) on the synthesized samples.
3. ``reasonembed evaluate`` of the base model and of the trained one on SciFact test (nDCG@10).

Each step runs as the CLI a user would type, in its own process, and is timed from the outside. No threshold on
quality: a 135 M annotator labels a handful of samples, so the trained model may well be worse than the base; the
point is that the loop runs end to end and its numbers are printed. ``--sources`` is the sample-count knob (one query
per source; samples are the queries with both a positive and a negative), so a larger run is one flag.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                "VLLM_CPU_KVCACHE_SPACE": "1"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("REASONEMBED_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--sources", type=int, default=6, help="source documents (one query each; the preset uses 6)")
    p.add_argument("--corpus-limit", type=int, default=None,
                   help="first N SciFact documents form the pool (default: max(40, 8 x sources))")
    p.add_argument("--steps", type=int, default=20, help="training steps (max_steps)")
    p.add_argument("--generator", default="smollm2-135m", help="generator and annotator model")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "loop"))
    return p.parse_args()


def step(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> float:
    """Run ``reasonembed <args>`` and return its wall seconds; on failure print the log's tail and exit."""
    log = log_dir / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "reasonembed.cli", *args], cwd=REPO, env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    print(f"{name:<18} {seconds:7.1f} s  (log: {log})", flush=True)
    if rc != 0:
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        sys.exit(f"{name} failed with exit code {rc}")
    return seconds


def ndcg(report_dir: Path) -> float:
    tasks = json.loads((report_dir / "report.json").read_text())["tasks"]
    return next(iter(tasks.values()))["metrics"]["ndcg_at_10"]


def main() -> None:
    a = parse()
    env = {**ENV_DEFAULTS, **os.environ, "REASONEMBED_DATA_DIR": a.data_dir}
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scifact = f"{Path(a.data_dir).resolve()}/beir/scifact"
    limit = a.corpus_limit or max(40, 8 * a.sources)
    run = f"loop-{a.generator.replace('/', '_')}-{a.sources}"
    root = out / run
    common = [f"run_id={run}", f"out={out}"]
    times = {
        "synthesize": step("synthesize", [
            "synthesize", "--config", "configs/synthesize/local-tiny.yaml", *common, f"data.corpus={scifact}",
            f"data.limit={limit}", f"prepare.n_per_domain={a.sources}", f"generator.model={a.generator}",
            f"annotator.model={a.generator}"], env, out),
        "train": step("train", [
            "train", "--config", "configs/train/local-tiny.yaml", *common, f"data.paths=[{root}/synthesize/format]",
            f"optim.max_steps={a.steps}"], env, out),
        "evaluate base": step("evaluate-base", [
            "evaluate", "--config", "configs/evaluate/local-tiny.yaml", f"run_id={run}", f"tasks=[{scifact}]",
            "embedder.model=minilm", f"out={root}/eval-base"], env, out),
        "evaluate trained": step("evaluate-trained", [
            "evaluate", "--config", "configs/evaluate/local-tiny.yaml", f"run_id={run}", f"tasks=[{scifact}]",
            f"embedder.model={root}/model", f"out={root}/eval-trained"], env, out),
    }
    fmt = json.loads((root / "synthesize" / "format" / "_manifest.json").read_text())
    ann = json.loads((root / "synthesize" / "annotate" / "_manifest.json").read_text())
    steps = json.loads((root / "train" / "_manifest.json").read_text())["extra"]["steps"]
    base, trained = ndcg(root / "eval-base"), ndcg(root / "eval-trained")
    print(f"\nloop: {a.generator} generator + annotator, {a.sources} sources, {limit}-document pool, "
          f"{steps} training steps run (max {a.steps}; 2 workers x 2 queries per step, one epoch)")
    print(f"samples (queries with a positive and a negative): {fmt['rows_out']} of {fmt['rows_in']} queries; "
          f"annotation scores {ann['extra'].get('score_histogram')}")
    print(f"SciFact test nDCG@10: base all-MiniLM-L6-v2 {base:.4f}, trained {trained:.4f} "
          f"(difference {trained - base:+.4f})")
    print("wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; total {sum(times.values()):.0f}")
    (root / "loop.json").write_text(json.dumps({"generator": a.generator, "sources": a.sources, "pool": limit,
                                                "max_steps": a.steps, "steps": steps, "samples": fmt["rows_out"], "ndcg_at_10_base": base,
                                                "ndcg_at_10_trained": trained, "wall_s": times}, indent=2))


if __name__ == "__main__":
    main()
