"""One vLLM engine per model per run: long-lived engine actors that several Ray Data pipelines share.

Why: ``ray.data.llm`` starts its vLLM actor pool inside each pipeline and tears it down when the pipeline ends, so a
synthesis run whose generate, reason and annotate stages use the same model paid actor + engine start-up three
times (about 35 s each with a tiny model on 2 CPU cores, 40+ s with SmolLM2-135M; minutes for an 8B model on a GPU).
Here the engine outlives the pipeline:

    rows ─ map(RequestBuilder) ─► Ray's preprocess ─► map_batches(forward) ──► EngineHost actor(s) ─► postprocess
                                                      (light tasks, no CPU)    Ray's vLLMEngineStageUDF, created
                                                                               once per engine key and run

- **Same engine code as ray.data.llm.** :class:`EngineHost` builds Ray's own ``vLLMEngineStageUDF`` (the class the
  ``vLLMEngineStage`` actor pool runs) from the very ``fn_constructor_kwargs`` and remote options that
  ``ray.data.llm.build_processor`` computes for the config, so request handling, sampling parameters, structured
  output, ``should_continue_on_error`` error rows and fatal-engine restarts are Ray's, unchanged.
- **Engine key.** Two configs share an engine when everything the engine is built from is equal: model source,
  engine kwargs (context length, dtype, seed, batch-invariant settings, structured-output backend, ...), resources
  and runtime env. Sampling, structured output per request, chat template and batch size are per request or per
  stage and do not split engines. Different models (or different engine settings) get their own engines.
- **Replicas.** ``concurrency: n`` (or ``[lo, hi]``) starts ``n`` (``hi``) engine actors for the run and spreads
  batches over them; on a GPU cluster the autoscaler adds the nodes they ask for. Engines hold their resources until
  the pool closes (end of the run): on a single GPU whose miner needs that GPU too, turn sharing off
  (``synthesize.share_engines: false``) to get per-stage engines back.
- **Exactly-once is unchanged.** Rows still carry their own seeds, and batch-invariant mode is an engine setting, so
  a shared engine produces the same text as a per-stage one.

Example::

    with EnginePool() as pool:
        ok1 = generate(rows, gen_cfg, build, engines=pool)      # starts the engine
        ok2 = generate(other, ann_cfg, build2, engines=pool)    # same model and engine settings: reuses it
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from reasonembed.config.llm import LLMEngineConfig

log = logging.getLogger(__name__)

# Ray Data options of the vLLM stage that describe the engine actor itself (everything else is per pipeline).
_ACTOR_OPTIONS = ("num_cpus", "num_gpus", "resources", "accelerator_type", "runtime_env")
# UDF constructor arguments that only tune how one pipeline feeds the engine (Ray uses them for a warning).
_PER_STAGE_KWARGS = ("batch_size", "max_concurrent_batches")


class EngineHost:
    """A Ray actor hosting one vLLM engine: Ray's ``vLLMEngineStageUDF``, kept alive across pipelines."""

    def __init__(self, udf_kwargs: dict[str, Any]):
        from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

        t0 = time.time()
        self.udf = vLLMEngineStageUDF(**udf_kwargs)
        self.start_s = time.time() - t0

    def ready(self) -> float:
        """Seconds the engine took to start (the actor answers only once ``__init__`` is done)."""
        return self.start_s

    async def process(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One Ray Data batch through the engine, exactly as the vLLM stage's ``__call__`` would return it."""
        out: dict[str, Any] = {}
        async for part in self.udf(batch):
            out.update(part)
        return out

    async def shutdown(self) -> None:
        """Stop the engine core process before the actor goes, quietly.

        vLLM's ``AsyncLLM.shutdown`` cancels the engine-core output queue, which puts an ``EngineDeadError`` into
        it before the ``output_handler`` task is cancelled, so that task logs an ERROR traceback on every clean
        shutdown (vllm/v1/engine/async_llm.py, ``output_handler``; core_client.py). Cancelling and awaiting the
        handler first leaves nothing to log.
        """
        import asyncio

        wrapper = getattr(self.udf, "llm", None)
        if wrapper is None:
            return
        handler = getattr(getattr(wrapper, "engine", None), "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await handler
        wrapper.shutdown()
        self.udf.llm = None


def forward_batch(batch: dict[str, Any], hosts: list) -> dict[str, Any]:
    """Ray Data task: send one batch to a random engine replica and return its output batch."""
    import ray

    return ray.get(random.choice(hosts).process.remote(batch))


@dataclass
class SharedEngine:
    """The engine actors of one engine key, plus what a pipeline needs to feed them."""

    key: str
    model_source: str
    hosts: list
    start_s: float
    uses: int = 0
    stages: list[str] = field(default_factory=list)


def vllm_stage_parts(cfg: LLMEngineConfig, model_source: str):
    """``(processor, vLLM stage, UDF kwargs, actor options)`` exactly as ``ray.data.llm.build_processor`` makes them."""
    from ray.data.llm import build_processor

    from reasonembed.llm.engine_args import to_processor_config

    processor = build_processor(to_processor_config(cfg, model_source))
    stage = processor.get_stage_by_name("vLLMEngineStage")
    kwargs = stage.get_dataset_map_batches_kwargs(batch_size=cfg.batch_size, data_column=processor.DATA_COLUMN)
    udf_kwargs = dict(kwargs["fn_constructor_kwargs"])
    options = {k: kwargs[k] for k in _ACTOR_OPTIONS if kwargs.get(k) not in (None, {}, "")}
    remote_args_fn = kwargs.get("ray_remote_args_fn")
    if remote_args_fn is not None:  # tensor/pipeline parallel: Ray's placement group for the engine's workers
        options.update(remote_args_fn())
    return processor, stage, udf_kwargs, options


def engine_key(model_source: str, udf_kwargs: dict[str, Any], options: dict[str, Any]) -> str:
    """Hash of everything an engine is built from (see the module docstring)."""
    build = {k: v for k, v in udf_kwargs.items() if k not in _PER_STAGE_KWARGS}
    shown = {k: v for k, v in options.items() if k != "scheduling_strategy"}
    blob = json.dumps({"model": model_source, "udf": build, "actor": shown}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def replica_count(cfg: LLMEngineConfig) -> int:
    """Engine actors to start: ``n`` for ``concurrency: n``, ``hi`` for ``[lo, hi]``."""
    return cfg.concurrency if isinstance(cfg.concurrency, int) else cfg.concurrency[1]


class EnginePool:
    """Engines of one run, keyed by :func:`engine_key`; a context manager that shuts them all down on exit."""

    def __init__(self) -> None:
        self.engines: dict[str, SharedEngine] = {}

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def apply(self, requests, cfg: LLMEngineConfig, model_source: str, stage_name: str = ""):
        """The lazy Dataset of Ray's processor over ``requests`` with the engine step sent to a shared engine."""
        import ray

        processor, stage, udf_kwargs, options = vllm_stage_parts(cfg, model_source)
        engine = self._get(model_source, udf_kwargs, options, replica_count(cfg), stage_name)
        ds = requests.map(processor.preprocess, **processor.preprocess_map_kwargs)
        for name, other in processor.stages.items():
            if other is not stage:  # our configs switch Ray's CPU stages off; refuse silently different graphs
                raise RuntimeError(f"shared engines support only the vLLM stage; processor also has {name}")
        ds = ds.map_batches(
            forward_batch, batch_size=cfg.batch_size, fn_kwargs={"hosts": engine.hosts}, zero_copy_batch=True,
            # The forwarders only wait on the engine: no CPU of their own, as many in flight as the engines accept.
            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=len(engine.hosts) * cfg.max_concurrent_batches),
        )
        return ds.map(processor.postprocess, **processor.postprocess_map_kwargs)

    def _get(self, model_source: str, udf_kwargs: dict, options: dict, replicas: int, stage_name: str):
        key = engine_key(model_source, udf_kwargs, options)
        engine = self.engines.get(key)
        if engine is None:
            engine = self.engines[key] = _start(key, model_source, udf_kwargs, options, replicas)
        elif len(engine.hosts) < replicas:
            log.info("engine %s: %d replicas running, a later stage asks for %d; keeping %d", key,
                     len(engine.hosts), replicas, len(engine.hosts))
        engine.uses += 1
        engine.stages.append(stage_name)
        return engine

    def summary(self) -> list[dict[str, Any]]:
        """One entry per engine started in this run: model, replicas, start-up seconds, stages served."""
        return [{"engine": e.key, "model_source": e.model_source, "replicas": len(e.hosts),
                 "start_s": round(e.start_s, 1), "stages": list(e.stages)} for e in self.engines.values()]

    def close(self) -> None:
        """Shut every engine down (engine core first, then the actor)."""
        import ray

        for engine in self.engines.values():
            for host in engine.hosts:
                try:
                    ray.get(host.shutdown.remote(), timeout=60)
                except Exception as exc:  # a dead actor or a hung shutdown must not keep the others alive
                    log.warning("engine %s: shutdown failed (%s); killing the actor", engine.key, exc)
                ray.kill(host)
        self.engines.clear()


def _idle_friendly(options: dict[str, Any]) -> dict[str, Any]:
    """CPU engines: keep the threads, drop the logical CPU reservation.

    A shared engine lives for the whole run but works only during LLM stages. Holding its CPUs in between starves
    the stages that run meanwhile: on a 2-CPU node the miner's encoder actor (1 CPU) plus one Ray Data task (1 CPU)
    wait forever behind an idle 1-CPU engine (measured: mining never started). So a CPU engine is scheduled with
    ``num_cpus=0`` and given its threads explicitly (Ray would otherwise set ``OMP_NUM_THREADS`` from the
    reservation: https://docs.ray.io/en/latest/ray-core/configure.html). While it generates, the CPU work beside it
    is only tokenizing and writing rows. GPU engines keep their reservation: GPUs are what they need.
    """
    if options.get("num_gpus"):
        return options
    threads = max(int(options.get("num_cpus") or 1), 1)
    env = dict(options.get("runtime_env") or {})
    env["env_vars"] = {"OMP_NUM_THREADS": str(threads), **dict(env.get("env_vars") or {})}
    return {**options, "num_cpus": 0, "runtime_env": env}


def _start(key: str, model_source: str, udf_kwargs: dict, options: dict, replicas: int) -> SharedEngine:
    import ray

    t0 = time.time()
    options = _idle_friendly(options)
    actor = ray.remote(EngineHost).options(
        # Ray's vLLM stage restarts an actor whose engine died (it exits the process on fatal engine errors);
        # keep that behaviour for the shared actor: restart it and retry the interrupted batch once.
        max_restarts=2, max_task_retries=1, max_concurrency=1000, **options,
    )
    hosts = [actor.remote(udf_kwargs) for _ in range(replicas)]
    starts = ray.get([h.ready.remote() for h in hosts])
    log.info("engine %s: %d replica(s) of %s up in %.1f s (engine start %.1f s)", key, replicas, model_source,
             time.time() - t0, max(starts))
    return SharedEngine(key=key, model_source=model_source, hosts=hosts, start_s=time.time() - t0)
