"""Scale bench: how the encode job, the FAISS index builds and ``/v1/search`` cost grow from 10k to 1M documents.

    python bench/scale.py --sizes 10000,100000,1000000 --kill-resume     # the full run (about an hour on 2 cores)
    python bench/scale.py --sizes 10000,50000 --no-real                  # a quick look

On a 2-core machine a real encoder's FLOPs hide the platform's overhead, so the curve is measured with a
random-weight 2-layer BERT (``reasonembed.models.tiny.ensure_tiny_bert``, hidden 64): what is timed is the platform
(reading, sharding, the Ray Data actor pool, the driver's per-shard commit, parquet writes). One more row encodes
20k real passages (SciFact + ImpliRet) with all-MiniLM-L6-v2, where recall@10 of IVF and HNSW against exact search
is measured on 1,000 real queries (random-weight vectors have no cluster structure, so their recall means nothing).

Per size, each step runs in its own process, watched by a sampler (psutil over the process tree every 0.5 s):
- encode: the job's CLI (``python -m reasonembed.cli encode``, index off: the index is reported separately): wall
  time, documents/s, peak RSS and peak private memory (RSS less shared pages) of the driver and of the largest Ray
  worker, each worker named by what it ran at its peak, bytes written;
- index: flat, IVF and HNSW, each built by ``reasonembed.index.encode.build_index`` (parts streamed in bounded
  batches): build time and peak RSS;
- search: the Serve app (``reasonembed.serving.http.app``) over the flat index, ``POST /v1/search`` (top_k 10):
  p50/p99 latency at concurrency 1 and 8.
``--kill-resume`` then encodes the largest size again, SIGKILLs the job at about half its parts, re-runs it and
checks that every id is in the parts exactly once. The table goes to stdout (and ``--json``), the plot of
documents/s and peak RSS against corpus size to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO / "bench")]  # run from a checkout without installing

import scale_corpus  # noqa: E402

ROWS_PER_SHARD = 2000
SHARDS_PER_ROUND = 16
INDEX_KINDS = ("flat", "ivf", "hnsw")


# ---- measuring a process tree -------------------------------------------------------------------------------------
class TreeSampler:
    """Peak RSS of a process and of each of its descendants, sampled every ``period`` seconds in a thread, and peak
    private memory (RSS minus shared pages).

    Ray workers are descendants of the driver on a local cluster (driver -> raylet -> workers), so the tree is the
    whole job. ``ray::`` processes are the workers; raylet, GCS and the dashboard are reported as the system.
    Why both: RSS counts every page of Ray's object store (a shared memory mapping, ``ray.connect`` config
    ``object_store_memory``) that a process has touched, and a long-lived process that writes or reads many
    blocks touches more of it over time; those pages are the store's, bounded by its size, not the process's.
    Private memory leaves them (and shared libraries) out."""

    def __init__(self, pid: int, period: float = 0.5):
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.peak: dict[int, int] = {}
        self.private: dict[int, int] = {}
        self.peak_name: dict[int, str] = {}
        self.names: dict[int, str] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()

    def _loop(self) -> None:
        import psutil

        while not self.stop_event.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    mem = p.memory_info()
                    # Re-read each time: a Ray worker starts as default_worker.py and renames itself ray::<task>.
                    self.names[p.pid] = " ".join(p.cmdline()[:2])[:160]
                except psutil.Error:
                    continue
                if mem.rss > self.peak.get(p.pid, 0):  # a reused task worker changes name: keep the one at its peak
                    self.peak[p.pid], self.peak_name[p.pid] = mem.rss, self.names[p.pid]
                self.private[p.pid] = max(self.private.get(p.pid, 0), mem.rss - mem.shared)
            self.stop_event.wait(self.period)

    def summary(self) -> dict:
        """Peak RSS (MB) of the driver, of the largest Ray worker, and the workers seen; the same for private memory."""
        workers = {pid: v for pid, v in self.peak.items() if self.names.get(pid, "").startswith("ray::")}
        private = {pid: self.private.get(pid, 0) for pid in workers}
        mb = 2**20
        top = sorted(workers, key=workers.get, reverse=True)
        actors = sorted(v for pid, v in workers.items() if "EmbedActor" in self.names.get(pid, ""))
        return {"driver_mb": round(self.peak.get(self.root.pid, 0) / mb, 1),
                "worker_max_mb": round(max(workers.values(), default=0) / mb, 1), "workers": len(workers),
                "driver_private_mb": round(self.private.get(self.root.pid, 0) / mb, 1),
                "worker_private_max_mb": round(max(private.values(), default=0) / mb, 1),
                # Which processes peaked (before one stream served every round, the job started one EmbedActor
                # per round, and the largest worker was the largest of as many actor processes as rounds).
                "worker_top": [[self.peak_name.get(pid, self.names[pid]), round(workers[pid] / mb, 1)] for pid in top[:5]],
                "embed_actors": len(actors),
                "embed_actor_median_mb": round(float(np.median(actors)) / mb, 1) if actors else None,
                "worker_peaks_mb": sorted((round(v / mb, 1) for v in workers.values()), reverse=True)}


def watched(cmd: list[str], env: dict | None = None, kill_when=None) -> tuple[float, dict, str]:
    """Run ``cmd`` in its own session under a TreeSampler; (wall s, RSS summary, stdout). ``kill_when()`` true
    SIGKILLs the whole session (the job and the Ray processes it started)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    with TreeSampler(proc.pid) as sampler:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
    # Ray's own processes can hold the pipe open a while after the step exits; the result line is already read
    # by then, but wait long enough that a slow flush is not cut off.
    reader.join(timeout=60)
    text = "".join(out)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n{text[-3000:]}")
    return time.time() - t0, sampler.summary(), text


def last_json(text: str) -> dict:
    lines = [x for x in text.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result line in the step's output:\n{text[-3000:]}")
    return json.loads(lines[-1])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- steps ----------------------------------------------------------------------------------------------------------
def encode_cmd(corpus: str, out: Path, model: str, actors: int) -> list[str]:
    return [sys.executable, "-m", "reasonembed.cli", "encode", "--data", corpus, "--out", str(out), "run_id=scale",
            f"embedder.model={model}", "index.build=false", f"engine.actors={actors}",
            f"engine.rows_per_shard={ROWS_PER_SHARD}", f"engine.shards_per_round={SHARDS_PER_ROUND}"]


def bench_encode(corpus: str, out: Path, n: int, model: str, actors: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall, rss, _ = watched(encode_cmd(corpus, out, model, actors))
    stage = out / "scale" / "encode"
    return {"docs": n, "wall_s": round(wall, 1), "docs_per_s": round(n / wall, 1), **rss,
            "bytes_written": folder_bytes(stage), "stage": str(stage)}


def bench_index(stage: str, kind: str) -> dict:
    """Build one index kind from the stage's parts in a fresh process; it goes to ``<stage>/index-<kind>``."""
    wall, rss, text = watched([sys.executable, __file__, "_index", stage, kind])
    return {"kind": kind, "build_s": last_json(text)["build_s"], "wall_s": round(wall, 1),
            "peak_mb": rss["driver_mb"], "index": str(Path(stage) / f"index-{kind}")}


def bench_search(index: str, model: str, queries: list[str]) -> dict:
    qfile = Path(index).parent / "queries.json"
    qfile.write_text(json.dumps(queries))
    _, _, text = watched([sys.executable, __file__, "_search", index, model, str(qfile)])
    return last_json(text)


def kill_resume(corpus: str, out: Path, n: int, model: str, actors: int) -> dict:
    """Encode, SIGKILL the job once about half the parts are committed, re-run; every id must be there once."""
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    stage = out / "scale" / "encode"
    n_shards = max(1, -(-n // ROWS_PER_SHARD))
    cmd = encode_cmd(corpus, out, model, actors)
    wall1, _, _ = watched(cmd, kill_when=lambda: len(list(stage.glob("part-*.parquet"))) >= n_shards // 2)
    at_kill = len(list(stage.glob("part-*.parquet")))
    wall2, _, text = watched(cmd)
    ids = [i for p in sorted(stage.glob("part-*.parquet")) for i in pq.read_table(p, columns=["doc_id"])
           .column("doc_id").to_pylist()]
    want = {scale_corpus.doc_id(i) for i in range(n)}
    return {"docs": n, "shards": n_shards, "parts_at_kill": at_kill, "killed_after_s": round(wall1, 1),
            "resume_s": round(wall2, 1), "resumed_line": next((x for x in text.splitlines() if "resumed past" in x), ""),
            "rows": len(ids), "distinct": len(set(ids)), "missing": len(want - set(ids)),
            "unexpected": len(set(ids) - want), "exactly_once": len(ids) == len(set(ids)) == n and set(ids) == want}


# ---- sub-processes ----------------------------------------------------------------------------------------------------
def index_main(stage_path: str, kind: str) -> None:
    """``scale.py _index STAGE KIND``: build one index kind from an encode stage's parts (the job's own
    ``build_index``), then move it to ``<stage>/index-<kind>``."""
    from reasonembed.config.encode import IndexConfig
    from reasonembed.index.encode import build_index
    from reasonembed.storage import open_run

    path = Path(stage_path)
    stage = open_run(str(path.parent.parent), path.parent.name).stage(path.name)
    t0 = time.time()
    build_index(stage, IndexConfig(kind=kind), {"bench": "scale"}, None)
    build_s = time.time() - t0
    shutil.rmtree(path / f"index-{kind}", ignore_errors=True)
    (path / "index").rename(path / f"index-{kind}")
    print(json.dumps({"build_s": round(build_s, 2)}), flush=True)


def _latencies(base: str, queries: list[str], concurrency: int, n: int) -> list[float]:
    import httpx

    def one(i: int, client: httpx.Client) -> float:
        t = time.perf_counter()
        r = client.post(base + "/v1/search", json={"query": queries[i % len(queries)], "top_k": 10})
        r.raise_for_status()
        return time.perf_counter() - t

    def worker(k: int) -> list[float]:
        with httpx.Client(timeout=60) as client:
            return [one(i, client) for i in range(k, n, concurrency)]

    with ThreadPoolExecutor(concurrency) as pool:
        return [x for part in pool.map(worker, range(concurrency)) for x in part]


def search_main(index: str, model: str, qfile: str, n_requests: int = 400) -> None:
    """``scale.py _search INDEX MODEL QUERIES``: serve the index with the Serve app on 127.0.0.1 and time
    ``POST /v1/search`` at concurrency 1 and 8 (after a warm-up); prints the percentiles as JSON."""
    import ray
    from ray import serve

    from reasonembed.runtime import connect_ray
    from reasonembed.serving.http.app import build_app
    from reasonembed.serving.runner import start_serve, wait_ready

    queries = json.loads(Path(qfile).read_text())
    connect_ray()
    port = start_serve("127.0.0.1", _free_port())
    try:
        serve.run(build_app({"app_name": "scale", "embedder": {"model": model}, "index": index,
                             "batching": {"max_batch_size": 32, "token_budget": 8192, "wait_timeout_s": 0.005},
                             "replica": {"num_cpus": 1, "topology": "fused"}}), name="scale", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout_s=300)
        _latencies(base, queries, 4, 40)  # warm-up
        out = {}
        for c in (1, 8):
            lat = np.array(_latencies(base, queries, c, n_requests // (2 if c == 1 else 1))) * 1000
            out[f"c{c}_p50_ms"], out[f"c{c}_p99_ms"] = round(float(np.percentile(lat, 50)), 1), \
                round(float(np.percentile(lat, 99)), 1)
            out[f"c{c}_qps"] = round(len(lat) / (lat.sum() / 1000 / c), 1)
        print(json.dumps(out), flush=True)  # before the shutdown logs, so the result line is never held back
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the real-model point -------------------------------------------------------------------------------------------
def real_point(work: Path, actors: int, n: int = 20_000) -> dict:
    """Encode ``n`` real passages with MiniLM through the job; recall@10 of IVF and HNSW against exact search on
    1,000 real queries, and each kind's build time."""
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.index import encode
    from reasonembed.index.faiss_index import IndexSpec, SearchIndex
    from reasonembed.models.embedder import Embedder
    from reasonembed.storage import open_run

    data = Path(os.environ.get("REASONEMBED_DATA_DIR", REPO.parent / "shared" / "data"))
    corpus, queries = scale_corpus.write_real(data, work / "real-corpus", n)
    row = bench_encode(str(corpus / "corpus.jsonl"), work / "real-run", n, "minilm", actors)
    ids, x = encode.load_embeddings(open_run(str(work / "real-run"), "scale").stage("encode"))
    q = Embedder(EmbedderConfig(model="minilm")).encode(queries, is_query=True)
    hits, builds = {}, {}
    for kind in INDEX_KINDS:
        t0 = time.time()
        index = SearchIndex.build(x, ids, IndexSpec(kind=kind))
        builds[kind] = round(time.time() - t0, 2)
        hits[kind] = [{d for d, _ in h} for h in index.search(q, 10)]
    recall = {k: round(float(np.mean([len(a & b) / 10 for a, b in zip(hits[k], hits["flat"], strict=True)])), 4)
              for k in ("ivf", "hnsw")}
    return {**row, "model": "minilm", "queries": len(queries), "recall_at_10": recall, "build_s": builds}


# ---- report -----------------------------------------------------------------------------------------------------------
def machine() -> str:
    import psutil

    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def table(rows: list[dict]) -> str:
    """The scale table (markdown): one line per size, encode then index then search."""
    head = ("| docs | model | encode s | docs/s | driver MB RSS / private | largest worker MB RSS / private "
            "| written MB | flat s/MB | ivf s/MB "
            "| hnsw s/MB | search c1 p50/p99 ms | c8 p50/p99 ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        idx = {i["kind"]: f"{i['build_s']:.1f} / {i['peak_mb']:.0f}" for i in r.get("index", [])}
        s = r.get("search") or {}
        lines.append(
            f"| {r['docs']:,} | {r['model']} | {r['wall_s']:.1f} | {r['docs_per_s']:,.0f} | {r['driver_mb']:.0f} / "
            f"{r.get('driver_private_mb', float('nan')):.0f} | {r['worker_max_mb']:.0f} / "
            f"{r.get('worker_private_max_mb', float('nan')):.0f} | {r['bytes_written'] / 2**20:.1f} | {idx.get('flat', '-')} "
            f"| {idx.get('ivf', '-')} | {idx.get('hnsw', '-')} "
            f"| {s.get('c1_p50_ms', '-')} / {s.get('c1_p99_ms', '-')} | {s.get('c8_p50_ms', '-')} / "
            f"{s.get('c8_p99_ms', '-')} |")
    return "\n".join(lines)


def flatness(rows: list[dict]) -> list[str]:
    """The two acceptance figures: peak RSS at the largest size within 1.3x of the smallest (driver and largest
    worker), and documents/s at the largest within 15 % of the second largest. Peak private memory (RSS less shared
    pages: the object store's, shared libraries) is printed beside the RSS figures."""
    tiny = [r for r in rows if r["model"] == "tiny-bert"]
    if len(tiny) < 2:
        return []
    a, b, c = tiny[0], tiny[-2], tiny[-1]
    out = []
    for key, private in (("driver_mb", "driver_private_mb"), ("worker_max_mb", "worker_private_max_mb")):
        ratio = c[key] / a[key] if a[key] else float("nan")
        line = (f"peak RSS {key} at {c['docs']:,} / at {a['docs']:,}: {c[key]:.0f} / {a[key]:.0f} MB = "
                f"{ratio:.2f}x ({'met' if ratio <= 1.3 else 'NOT met'}: <= 1.3x)")
        if c.get(private) and a.get(private):
            line += (f"; private {c[private]:.0f} / {a[private]:.0f} MB = {c[private] / a[private]:.2f}x")
        out.append(line)
    ratio = c["docs_per_s"] / b["docs_per_s"]
    out.append(f"docs/s at {c['docs']:,} / at {b['docs']:,}: {c['docs_per_s']:,.0f} / {b['docs_per_s']:,.0f} = "
               f"{ratio:.2f} ({'met' if ratio >= 0.85 else 'NOT met'}: within 15 %)")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiny = [r for r in rows if r["model"] == "tiny-bert"]
    n = [r["docs"] for r in tiny]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n, [r["docs_per_s"] for r in tiny], "o-")
    ax1.set(xscale="log", xlabel="corpus size (documents)", ylabel="documents/s", title="encode throughput",
            ylim=(0, None))
    ax2.plot(n, [r["driver_mb"] for r in tiny], "o-", label="driver")
    ax2.plot(n, [r["worker_max_mb"] for r in tiny], "s-", label="largest Ray worker")
    if all("worker_private_max_mb" in r for r in tiny):
        ax2.plot(n, [r["driver_private_mb"] for r in tiny], "o--", label="driver, private")
        ax2.plot(n, [r["worker_private_max_mb"] for r in tiny], "s--", label="largest worker, private")
    ax2.set(xscale="log", xlabel="corpus size (documents)", ylabel="peak RSS (MB)", title="encode peak RSS",
            ylim=(0, None))
    ax2.legend()
    fig.suptitle("reasonembed encode job, tiny 2-layer BERT (platform overhead)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)



def size_row(n: int, work: Path, args, queries: list[str]) -> dict:
    """Encode, index and search at one corpus size with the tiny encoder."""
    from reasonembed.models.tiny import ensure_tiny_bert

    model = str(ensure_tiny_bert())
    corpus = scale_corpus.write_synthetic(str(work / f"corpus-{n}"), n, args.seed)
    row = {"model": "tiny-bert", **bench_encode(corpus, work / f"run-{n}", n, model, args.actors)}
    print(f"[scale] encode {n:,}: {json.dumps(row)}", flush=True)
    row["index"] = [bench_index(row["stage"], kind) for kind in INDEX_KINDS]
    print(f"[scale] index {n:,}: {json.dumps(row['index'])}", flush=True)
    if not args.no_search:
        try:
            row["search"] = bench_search(row["index"][0]["index"], model, queries)
        except RuntimeError as exc:  # recorded, so the encode and index rows of this size are not lost
            row["search"] = {"error": str(exc)[-2000:]}
        print(f"[scale] search {n:,}: {json.dumps(row['search'])}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--work", default=str(REPO / "runs" / "scale"), help="corpora and runs (local or s3:// corpus)")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-resume", action="store_true", help="kill and resume the encode job at the largest size")
    ap.add_argument("--no-real", action="store_true", help="skip the 20k MiniLM row")
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--plot", default=str(REPO / "bench" / "results" / "scale.png"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"[scale] machine: {machine()}", flush=True)
    queries = scale_corpus.synthetic_queries(200)
    t0 = time.time()
    rows = [size_row(n, work, args, queries) for n in sizes]
    real = None if args.no_real else real_point(work, args.actors)
    if real:
        rows.append({**real, "index": [{"kind": k, "build_s": v, "peak_mb": float("nan")}
                                       for k, v in real["build_s"].items()]})
    kr = None
    if args.kill_resume:
        from reasonembed.models.tiny import ensure_tiny_bert

        corpus = scale_corpus.write_synthetic(str(work / f"corpus-{sizes[-1]}"), sizes[-1], args.seed)
        kr = kill_resume(corpus, work / "kill-resume", sizes[-1], str(ensure_tiny_bert()), args.actors)
    print(f"\n## Scale table ({machine()})\n\n{table(rows)}\n")
    for line in flatness(rows):
        print(line)
    if real:
        print(f"real point: {real['docs']:,} passages, MiniLM, recall@10 vs exact on {real['queries']} queries: "
              f"{real['recall_at_10']}")
    if kr:
        print(f"kill-resume: {json.dumps(kr)}")
    plot(rows, Path(args.plot))
    print(f"plot: {args.plot}; total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows, "kill_resume": kr}, indent=1))
    return 0 if kr is None or kr["exactly_once"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_index":
        index_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_search":
        search_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())
