"""Config of the Redapter training job (`reasonembed train`, jobs/train.py; docs/algorithm.md section 2).

Batch arithmetic (the paper's run, configs/train/paper-qwen3-8b.yaml):
    global batch = per-device queries x data-parallel workers x gradient accumulation = 8 x 8 x 1 = 64 queries,
    each with 1 positive + (group - 1) negatives, so with group 16 one softmax runs over 64 x 16 = 1024 passages.
Per-device queries and group sizes come from the data (per domain) unless ``data.batch_size`` /
``data.train_group_size`` override them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from reasonembed.config.base import JobConfig, StrictModel
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.redapter.data import TrainDataConfig
from reasonembed.redapter.loss import LossConfig

DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(StrictModel):
    """Low-rank adapters (peft) on the backbone's projection layers; merged into the weights at export."""

    enabled: bool | None = Field(
        None, description="Train LoRA adapters instead of all weights. None: on for decoder LLMs (the paper), off "
        "for encoders such as MiniLM (full fine-tuning)."
    )
    r: int = Field(32, ge=1, description="Adapter rank. Paper: 32.")
    alpha: int = Field(64, ge=1, description="LoRA scaling numerator (scale = alpha / r). Paper: 64.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter input (FlagEmbedding's default).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DECODER_LORA_TARGETS),
        min_length=1,
        description="Names of the Linear layers that get adapters (last name component). Paper: q/k/v/o/gate/up/down "
        "projections of Qwen3/Llama. A name that matches no Linear layer of the backbone is an error.",
    )


class OptimSettings(StrictModel):
    """AdamW with linear warmup and linear decay to zero (docs/algorithm.md section 2, Recipe)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate. Paper: 1e-4.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of optimizer steps of linear warmup from 0.")
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="After warmup: linear decay to 0 at the last step (paper), or constant."
    )
    epochs: int = Field(1, ge=1, description="Passes over the training samples. Paper: 1.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (None: epochs x steps per epoch). The LR "
        "schedule spans min(max_steps, epochs x steps per epoch)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this value (None: no clipping)."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Global batches per optimizer step. Each global batch keeps its own softmax over its "
        "cross-device negatives; gradients are averaged over the accumulated batches. Paper: 1."
    )


class ScalingSettings(StrictModel):
    """Ray Train ScalingConfig: how many data-parallel workers and what each one gets."""

    num_workers: int = Field(1, ge=1, description="Data-parallel training workers (one GPU each with use_gpu).")
    use_gpu: bool = Field(False, description="One GPU per worker (Ray Train sets CUDA_VISIBLE_DEVICES).")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}. None: {CPU: 1} on CPU, Ray's default "
        "(1 GPU) with use_gpu. On CPU the worker's torch threads follow its CPU count."
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type for GPU workers, e.g. 'H100'.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement group strategy of the workers."
    )


class CheckpointSettings(StrictModel):
    """Checkpoints through ray.train.report into RunConfig(storage_path=...); resumed automatically."""

    every_n_steps: int = Field(
        100, ge=1, description="Save every N optimizer steps (and always after the last step)."
    )
    num_to_keep: int | None = Field(2, ge=1, description="Keep the newest N checkpoints (None: all).")
    storage_path: str | None = Field(
        None, description="Local folder or s3:// URI for Ray Train's run folder. None: <out>/<run_id>/train."
    )
    name: str = Field(
        "ray", min_length=1, description="Ray Train run name (sub-folder of storage_path). A job submitted again with "
        "the same storage_path and name resumes from its latest checkpoint."
    )
    resume_from: str | None = Field(
        None, description="Start from this checkpoint folder (local or s3://) when the run itself has none yet, "
        "e.g. to continue another run's training. It must come from a compatible config."
    )


class LogSettings(StrictModel):
    """Per-step metrics: Ray Train reporter, metrics.jsonl/.csv next to the checkpoints, a PNG at the end."""

    every_n_steps: int = Field(1, ge=1, description="Report metrics to Ray Train every N optimizer steps.")
    flush_every_n_steps: int = Field(
        10, ge=1, description="Rewrite metrics.jsonl/.csv in storage every N steps (and at every checkpoint)."
    )
    plot: bool = Field(True, description="Draw loss, RI and LR curves to curves.png at the end.")


class ExportSettings(StrictModel):
    """The trained model as a Hugging Face folder that SentenceTransformer(path) loads directly."""

    enabled: bool = Field(True, description="Export after training (rank 0, from the final weights).")
    path: str | None = Field(None, description="Local folder or s3:// URI. None: <out>/<run_id>/model.")
    merge_lora: bool = Field(
        True, description="Merge LoRA adapters into the base weights (a plain model). False: also write the "
        "adapter folder (adapter/) next to the merged model."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Stored weight dtype. auto: bfloat16 when trained in bf16, else float32."
    )
    query_instruction: str | None = Field(
        None, description="Task instruction stored as the sentence-transformers 'query' prompt. None: the training "
        "data's prompt (the most frequent one when domains differ; every domain's prompt is also stored under its "
        "domain name)."
    )


class DevEvalSettings(StrictModel):
    """Optional retrieval evaluation of the exported model on a BEIR-layout dev set at the end of training."""

    data: str | None = Field(
        None, description="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels). None: no evaluation."
    )
    split: str = Field("dev", description="qrels/<split>.tsv when the folder has no top-level qrels.tsv.")
    instruction: str | None = Field(
        None, description="Query instruction for the dev set (None: the exported model's 'query' prompt)."
    )
    max_queries: int | None = Field(None, ge=1, description="Evaluate on the first N judged queries only.")
    compare_base: bool = Field(True, description="Also evaluate the base model, to report the gain.")
    k: int = Field(100, ge=1, description="Documents retrieved per query.")


class TrainJobConfig(JobConfig):
    """`reasonembed train`: Redapter fine-tuning with RI-InfoNCE on Ray Train (DDP or DeepSpeed), resumable."""

    FLAGS: ClassVar[dict[str, str]] = {"model": "embedder.model", "data": "data.paths", "out": "out"}

    data: TrainDataConfig = Field(description="Training samples: paths and per-domain group/batch sizes.")
    embedder: EmbedderConfig = Field(
        default_factory=lambda: EmbedderConfig(max_length=512),
        description="Backbone, pooling, query format and max length (paper: 512 for queries and passages). dtype "
        "and device are set by the trainer (precision, Ray Train's device).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters (decoders by default).")
    loss: LossConfig = Field(default_factory=LossConfig, description="RI-InfoNCE settings (tau, kappa, RI start).")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimizer and LR schedule.")
    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="Data parallelism: torch DDP (gloo on CPU, nccl on GPU) or DeepSpeed ZeRO."
    )
    zero_stage: int = Field(
        1, ge=0, le=2, description="DeepSpeed ZeRO stage (paper: 1). Stage 3 is not offered: export reads whole "
        "parameters on rank 0."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU (DeepSpeed bf16 / torch autocast), fp32 on CPU (no bf16 units here)."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward to save memory. None: on for decoders (paper), off "
        "for encoders."
    )
    passage_chunk_rows: int | None = Field(
        None, ge=0, description="Rows per passage forward pass: a step's passages are sorted by length and embedded in "
        "chunks of this many rows, each padded to its own longest row (same embeddings, less padding and smaller "
        "attention matrices). None: the rank's queries per step (B chunks of the B x G passages); 0: one pass."
    )
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Ray Train workers.")
    checkpointing: CheckpointSettings = Field(
        default_factory=CheckpointSettings, description="Checkpoint frequency, retention and storage."
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the latest checkpoint after a failure (-1: unlimited)."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Metrics logging.")
    export: ExportSettings = Field(default_factory=ExportSettings, description="Model export.")
    eval: DevEvalSettings = Field(default_factory=DevEvalSettings, description="Optional end-of-training eval.")

    @model_validator(mode="after")
    def _check(self) -> TrainJobConfig:
        if "{query}" not in self.embedder.query_format or not self.embedder.query_format.endswith("{query}"):
            raise ValueError(
                "embedder.query_format must end with '{query}' so that the exported model can store the instruction "
                "as a sentence-transformers prompt prefix"
            )
        return self
