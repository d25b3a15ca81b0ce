"""How much memory a Ray Data map actor, and a Ray Data parquet read, keep of the data that went through them.

    python bench/actor_memory.py                       # 200 calls of 1,024 x 256 float32 (1 MiB) each
    python bench/actor_memory.py --calls 400 --dim 64
    python bench/actor_memory.py --read runs/scale/corpus-1000000   # only the read cases, over a parquet folder

Why this exists: the scale bench (bench/scale.py) saw the encode job's long-lived processes grow with the corpus:
an Embedder actor that had streamed many rounds, and the worker that read and staged the corpus. This script
isolates both from the model. The map cases return the same arrays (float32 [1024, dim], fresh each call) and
sample the actor's private memory (RSS less shared pages) every 20 calls:

- ``ray-data``: ``map_batches(Actor, ActorPoolStrategy(size=1), batch_size=1024)`` consumed with ``iter_batches``
  by the driver, as the encode job does, over parquet files of 10,240 rows (id, text; the shape of the encode
  job's staged input) read two ways, Ray 2.60's default ``ray.data.read_parquet`` (DataSourceV2) and
  ``reasonembed.index.reader.read_parquet`` (the V1 datasource), and over ``ray.data.range``;
- ``ray-core``: a plain actor whose streaming generator method (``num_returns="streaming"``) yields the same
  arrays, consumed and dropped by the driver one by one;
- ``read``: the parquet files alone read both ways and consumed by the driver, with the read workers' peak private
  memory sampled from the driver, at a quarter of the files and at all of them.

It prints the slope (MiB of private memory per call, least squares over the samples) against the MiB returned per
call. A slope near the output size means the process keeps about everything it returned. What was found, and why
the encode job reads parquet on the V1 path: docs/scale.md, "What holds memory".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

SAMPLE_EVERY = 20


def _private_mb() -> float:
    import psutil

    m = psutil.Process().memory_info()
    return (m.rss - m.shared) / 2**20


class _DataActor:
    """The Ray Data UDF: a fresh float32 [rows, dim] block a call, and the actor's private memory every
    SAMPLE_EVERY calls (in a column: the driver reads it from the output)."""

    def __init__(self, dim: int):
        self.dim, self.calls = dim, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        n = len(batch["id"])
        mem = _private_mb() if self.calls % SAMPLE_EVERY == 0 else -1.0
        return {"emb": np.random.default_rng(self.calls).random((n, self.dim), dtype=np.float32),
                "call": np.full(n, self.calls, np.int32), "private_mb": np.full(n, mem, np.float32)}


def _write_parquet(calls: int, folder: str) -> list[str]:
    """``calls * 1,024`` rows (id, a 40-word text) in parquet files of 10,240 rows: the shape of the encode job's
    input (its staged rounds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)])
    for k in range(0, calls * 1024, 10_240):
        n = min(10_240, calls * 1024 - k)
        texts = [" ".join(rng.choice(words, 40)) for _ in range(n)]
        pq.write_table(pa.table({"id": np.arange(k, k + n), "text": texts}), f"{folder}/part-{k:08d}.parquet")
    return sorted(str(p) for p in Path(folder).glob("*.parquet"))


def _read(files: list[str], how: str):
    """The files as a Ray dataset: Ray's default read (``ray``) or the encode job's (``reasonembed``)."""
    import ray

    from reasonembed.index.reader import read_parquet

    return ray.data.read_parquet(files) if how == "ray" else read_parquet(files)


def ray_data_case(calls: int, dim: int, files: list[str] | None, how: str = "") -> list[tuple[int, float]]:
    import ray

    ds = _read(files, how) if files else ray.data.range(calls * 1024)
    ds = ds.map_batches(
        _DataActor, fn_constructor_kwargs={"dim": dim}, compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=1024, batch_format="numpy")
    samples = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for c, m in zip(batch["call"], batch["private_mb"], strict=True):
            if m >= 0:
                samples[int(c)] = float(m)
    return sorted(samples.items())


def ray_core_case(calls: int, dim: int) -> list[tuple[int, float]]:
    import ray

    @ray.remote
    class Gen:
        def __init__(self):
            self.calls = 0

        def run(self, k: int):
            for _ in range(k):
                self.calls += 1
                yield np.random.default_rng(self.calls).random((1024, dim), dtype=np.float32)

        def private_mb(self) -> float:
            return _private_mb()

    actor = Gen.remote()
    samples = []
    for i in range(calls // SAMPLE_EVERY):
        for ref in actor.run.options(num_returns="streaming").remote(SAMPLE_EVERY):
            ray.get(ref)
            del ref
        samples.append(((i + 1) * SAMPLE_EVERY, ray.get(actor.private_mb.remote())))
    ray.kill(actor)
    return samples


@contextmanager
def _cluster():
    """A fresh local Ray cluster for one case: Ray reuses idle worker processes, so a case run after another could
    start in a process that already holds the earlier case's memory."""
    import ray

    from reasonembed.config.base import RayConfig
    from reasonembed.runtime import connect_ray

    connect_ray(RayConfig(num_cpus=2))
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def _watch_readers(stop: threading.Event, peak: list[float]) -> None:
    """Keep in ``peak[0]`` the largest private MiB of a Ray read worker until ``stop`` is set."""
    import psutil

    while not stop.is_set():
        for p in psutil.process_iter():
            try:
                if "Read" in " ".join(p.cmdline()[:1]):
                    m = p.memory_info()
                    peak[0] = max(peak[0], (m.rss - m.shared) / 2**20)
            except psutil.Error:
                continue
        stop.wait(0.1)


def read_case(files: list[str], how: str) -> list[tuple[int, float]]:
    """Peak private MiB of the read workers reading the first quarter of the files, then all of them; the x value
    is the 1,024-row calls those rows stand for."""
    out = []
    for part in (files[:max(1, len(files) // 4)], files):
        peak, stop = [0.0], threading.Event()
        with _cluster():  # a fresh one: a reused worker would carry what an earlier read left in it
            thread = threading.Thread(target=_watch_readers, args=(stop, peak), daemon=True)
            thread.start()
            rows = sum(len(b["id"]) for b in _read(part, how).iter_batches(batch_format="numpy", batch_size=None))
            stop.set()
            thread.join()
        out.append((rows // 1024, peak[0]))
    return out


def slope(samples: list[tuple[int, float]], skip: int = 1) -> float:
    """MiB of private memory per call: least-squares slope of the samples after the first ``skip`` (warm-up)."""
    x = np.array([c for c, _ in samples[skip:]], float)
    y = np.array([m for _, m in samples[skip:]], float)
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--read", default=None, help="a folder of parquet files: run only the read cases, over them")
    args = ap.parse_args(argv)
    import ray

    out_mb = 1024 * args.dim * 4 / 2**20
    result = {"ray": ray.__version__, "calls": args.calls, "output_mib_per_call": out_mb}
    tmp = tempfile.TemporaryDirectory()
    files = sorted(str(p) for p in Path(args.read).glob("*.parquet")) if args.read else _write_parquet(args.calls, tmp.name)
    cases = (("ray-data, parquet input, Ray's default read", lambda c, d: ray_data_case(c, d, files, "ray")),
             ("ray-data, parquet input, reasonembed read", lambda c, d: ray_data_case(c, d, files, "reasonembed")),
             ("ray-data, range input", lambda c, d: ray_data_case(c, d, None)),
             ("ray-core", ray_core_case),
             ("read, Ray's default read", lambda c, d: read_case(files, "ray")),
             ("read, reasonembed read", lambda c, d: read_case(files, "reasonembed")))
    for name, case in cases:
        if args.read and not name.startswith("read"):
            continue
        with nullcontext() if name.startswith("read") else _cluster():  # a read case starts one per point
            samples = case(args.calls, args.dim)
        per_call = slope(samples, skip=0 if name.startswith("read") else 1)
        result[name] = {"samples": samples, "mib_per_call": round(per_call, 3)}
        if name.startswith("read"):  # a call here is 1,024 rows read
            print(f"[actor-memory] {name}: read workers' peak private memory {samples[0][1]:.0f} MiB after "
                  f"{samples[0][0] * 1024:,} rows, {samples[-1][1]:.0f} MiB after {samples[-1][0] * 1024:,} rows; "
                  f"{per_call * 1e6 / 1024:.1f} MiB per million rows", flush=True)
            continue
        print(f"[actor-memory] {name}: private memory {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MiB over "
              f"{samples[-1][0]} calls; {per_call:.3f} MiB per call, output {out_mb:.3f} MiB per call "
              f"(ratio {per_call / out_mb:.2f})", flush=True)
    tmp.cleanup()
    print(json.dumps({k: v for k, v in result.items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
