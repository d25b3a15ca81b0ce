"""How much memory a Ray Data map actor keeps of the output it has returned, beside a plain Ray actor.

    python bench/actor_memory.py                       # 200 calls of 1,024 x 256 float32 (1 MiB) each
    python bench/actor_memory.py --calls 400 --dim 64

Why this exists: the encode job streams every round of a large corpus through its Embedder actors, and the scale
bench (bench/scale.py) saw a long-lived actor's private memory (RSS less shared pages) grow with the corpus even
with the heap trimmed after every window (``reasonembed.heap``). This script isolates it from the model. Both
cases return the same arrays (float32 [1024, dim], fresh each call) and sample the actor's private memory every 20
calls:

- ``ray-data``: ``ray.data.range(calls * 1024).map_batches(Actor, ActorPoolStrategy(size=1), batch_size=1024)``,
  consumed with ``iter_batches`` by the driver, as the encode job does;
- ``ray-data-task``: the same through a function UDF (Ray Data tasks, whose worker processes Ray reuses);
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


def _task_udf(batch: dict[str, np.ndarray], dim: int) -> dict[str, np.ndarray]:
    """The same output from a Ray Data *task* (a function UDF): task workers are reused from task to task, so what
    a worker keeps accumulates the same way. The worker's pid and call count let the driver follow one process."""
    import os

    global _TASK_CALLS
    _TASK_CALLS = globals().get("_TASK_CALLS", 0) + 1
    n = len(batch["id"])
    return {"emb": np.random.default_rng(_TASK_CALLS).random((n, dim), dtype=np.float32),
            "call": np.full(n, _TASK_CALLS, np.int32), "pid": np.full(n, os.getpid(), np.int64),
            "private_mb": np.full(n, _private_mb(), np.float32)}


def ray_data_task_case(calls: int, dim: int) -> list[tuple[int, float]]:
    """Samples of the task worker that ran the most calls (one block of 1,024 rows a task)."""
    import ray

    ds = ray.data.range(calls * 1024, override_num_blocks=calls).map_batches(
        _task_udf, fn_kwargs={"dim": dim}, batch_size=None, batch_format="numpy")
    by_pid: dict[int, dict[int, float]] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for p, c, m in zip(batch["pid"], batch["call"], batch["private_mb"], strict=True):
            by_pid.setdefault(int(p), {})[int(c)] = float(m)
    return sorted(max(by_pid.values(), key=len).items())


def ray_data_case(calls: int, dim: int) -> list[tuple[int, float]]:
    import ray

    ds = ray.data.range(calls * 1024).map_batches(
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
    for name, case in (("ray-data", ray_data_case), ("ray-data-task", ray_data_task_case),
                       ("ray-core", ray_core_case)):
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
