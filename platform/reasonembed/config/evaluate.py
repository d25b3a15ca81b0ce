"""Config of the evaluation job: which tasks, which retriever, how deep, where reports go."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from reasonembed.config.base import JobConfig
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.encode import EncodeEngineConfig, IndexConfig
from reasonembed.evaluation.bm25 import BM25Config


class EvaluateJobConfig(JobConfig):
    """`reasonembed evaluate`: retrieval on BEIR-layout folders, BRIGHT and R2MED -> report.json / report.md /
    run.trec / PNG under ``out``."""

    FLAGS: ClassVar[dict[str, str]] = {
        "model": "embedder.model", "data": "tasks", "benchmark": "tasks", "out": "out", "retriever": "retriever",
        "protocol": "protocol",
    }

    tasks: list[str] = Field(
        default_factory=lambda: ["beir/scifact"],
        description="Task specs: a BEIR-layout folder path, '<benchmark>/<task>' under data_dir (beir/scifact, "
        "impliret/wknow-multispeaker, bright/biology, r2med/Biology), or a whole benchmark ('bright', 'r2med').",
    )
    data_dir: str | None = Field(
        None, description="Root of local benchmark folders (None: $REASONEMBED_DATA_DIR, else ../shared/data)."
    )
    source: Literal["auto", "local", "hub"] = Field(
        "auto", description="BRIGHT/R2MED: local folder if it has a corpus, else the Hugging Face hub (auto)."
    )
    retriever: Literal["dense", "bm25", "hybrid"] = Field("dense", description="dense | bm25 | hybrid.")
    protocol: Literal["corpus", "pool"] = Field(
        "corpus", description="corpus: each query searches the whole corpus. pool: each query ranks only the "
        "documents its qrels list (every row, whatever the score: a reranking or multiple-choice pool); documents "
        "outside a query's pool are never scored for it (reasonembed.evaluation.pool)."
    )
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="The dense model.")
    max_length: int | None = Field(
        None, ge=8, description="Max tokens per input for EVERY task, overriding both a benchmark's own length and "
        "embedder.max_length. None: a task whose benchmark fixes a length uses it (R2MED: 512), other tasks use "
        "embedder.max_length (None there: the model's). report.json records each task's length and its source."
    )
    use_task_instruction: bool = Field(
        True, description="Format queries with the task's instruction (BRIGHT/R2MED) when the task has one."
    )
    top_k: int | None = Field(
        None, ge=1, description="Documents retrieved per query before excluded ids are removed "
        "(None: 2000 for BRIGHT as in the paper, 1000 otherwise). Protocol pool: None ranks each whole pool; a "
        "number keeps each query's best top_k pool documents."
    )
    k_values: list[int] = Field(default_factory=lambda: [1, 5, 10, 100], description="Cut-offs for nDCG/recall.")
    bm25: BM25Config = Field(default_factory=BM25Config, description="BM25 settings (retriever bm25 or hybrid).")
    hybrid_alpha: float = Field(
        0.5, ge=0, le=1, description="Hybrid score = alpha * dense + (1 - alpha) * bm25, each min-max normalised."
    )
    corpus_encoding: Literal["ray", "local"] = Field(
        "ray", description="ray: encode the corpus with the Ray Data encode job (resumable, cached in the run "
        "dir); local: in this process (small corpora, no cluster)."
    )
    engine: EncodeEngineConfig = Field(default_factory=EncodeEngineConfig, description="Corpus encoding engine.")
    prebuilt_index: str | None = Field(
        None, description="Index folder written by `reasonembed encode` (<run>/encode/index) to search instead of "
        "encoding the corpus again; single-task runs only. Its recorded model must match the embedder and it must "
        "cover the task's corpus."
    )
    index: IndexConfig = Field(default_factory=IndexConfig, description="FAISS index for the corpus.")
    max_queries: int | None = Field(None, ge=1, description="Only the first N queries per task (smoke runs).")
    name: str | None = Field(None, description="Row label in report.md (None: the model or retriever name).")
    plots: bool = Field(True, description="Write a PNG bar chart per task.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, v):
        # `--data <dir>` sets a single string; a list is the YAML form.
        return [v] if isinstance(v, str) else v
