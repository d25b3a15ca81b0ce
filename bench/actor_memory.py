"""How much memory a Ray Data map actor keeps of the output it has returned, beside a plain Ray actor.

    python bench/actor_memory.py                       # 200 calls of 1,024 x 256 float32 (1 MiB) each
    python bench/actor_memory.py --calls 400 --dim 64

Why this exists: the encode job streams every round of a large corpus through its Embedder actors, and the scale
bench (bench/scale.py) saw a long-lived actor's private memory (RSS less shared pages) grow with the corpus even
with the heap trimmed after every window (``reasonembed.heap``). This script isolates it from the model. Both
cases return the same arrays (float32 [1024, dim], fresh each call) and sample the actor's private memory every 20
calls:

- ``ray-data``: ``map_batches(Actor, ActorPoolStrategy(size=1), batch_size=1024)`` over parquet files of 10,240
  rows (id, text; the shape of the encode job's staged input) and, apart, over ``ray.data.range``, consumed with
  ``iter_batches`` by the driver, as the encode job does;
- ``ray-core``: a plain actor whose streaming generator method (``num_returns="streaming"``) yields the same
  arrays, consumed and dropped by the driver one by one.

It prints the slope (MiB of private memory per call, least squares over the samples) against the MiB returned per
call. A slope near the output size means the process keeps about everything it returned. The encode job bounds
what its actors keep by starting a fresh pool every ``engine.rounds_per_pool`` rounds (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json

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


def _parquet_input(calls: int, folder: str):
    """``calls * 1,024`` rows (id, a 40-word text) in parquet files of 10,240 rows: the shape of the encode job's
    input (its staged rounds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)])
    for k in range(0, calls * 1024, 10_240):
        n = min(10_240, calls * 1024 - k)
        texts = [" ".join(rng.choice(words, 40)) for _ in range(n)]
        pq.write_table(pa.table({"id": np.arange(k, k + n), "text": texts}), f"{folder}/part-{k:08d}.parquet")
    return ray.data.read_parquet(folder)


def ray_data_case(calls: int, dim: int, source: str = "parquet") -> list[tuple[int, float]]:
    import tempfile

    import ray

    tmp = tempfile.TemporaryDirectory()
    ds = _parquet_input(calls, tmp.name) if source == "parquet" else ray.data.range(calls * 1024)
    ds = ds.map_batches(
        _DataActor, fn_constructor_kwargs={"dim": dim}, compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=1024, batch_format="numpy")
    samples = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for c, m in zip(batch["call"], batch["private_mb"], strict=True):
            if m >= 0:
                samples[int(c)] = float(m)
    tmp.cleanup()
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


def slope(samples: list[tuple[int, float]]) -> float:
    """MiB of private memory per call: least-squares slope of the samples after the first (warm-up)."""
    x = np.array([c for c, _ in samples[1:]], float)
    y = np.array([m for _, m in samples[1:]], float)
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args(argv)
    import ray

    from reasonembed.config.base import RayConfig
    from reasonembed.runtime import connect_ray

    connect_ray(RayConfig(num_cpus=2))
    ray.data.DataContext.get_current().enable_progress_bars = False
    out_mb = 1024 * args.dim * 4 / 2**20
    result = {"ray": ray.__version__, "calls": args.calls, "output_mib_per_call": out_mb}
    cases = (("ray-data, parquet input", ray_data_case),
             ("ray-data, range input", lambda c, d: ray_data_case(c, d, "range")),
             ("ray-core", ray_core_case))
    for name, case in cases:
        samples = case(args.calls, args.dim)
        result[name] = {"samples": samples, "mib_per_call": round(slope(samples), 3)}
        print(f"[actor-memory] {name}: private memory {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MiB over "
              f"{samples[-1][0]} calls; {slope(samples):.3f} MiB per call, output {out_mb:.3f} MiB per call "
              f"(ratio {slope(samples) / out_mb:.2f})", flush=True)
    ray.shutdown()
    print(json.dumps({k: v for k, v in result.items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
