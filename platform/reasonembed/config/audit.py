"""Config of `reasonembed audit-annotator` (jobs/audit_annotator.py): how well the relevance annotator separates a
benchmark's judged-relevant documents from random non-relevant ones.

Sizing: requests = n_queries x (positives_per_query + negatives_per_query) (default 40 x 2 = 80), one engine start.
The annotator defaults are those of configs/synthesize/local-tiny.yaml, so the audit scores exactly what the tiny
synthesis preset would.
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from reasonembed.config.base import JobConfig
from reasonembed.config.llm import LLMEngineConfig, SamplingConfig, StructuredOutputConfig
from reasonembed.config.synthesize import AnnotateConfig, DomainProfileConfig, FormatConfig

_DOMAIN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _preset_annotator() -> LLMEngineConfig:
    # The annotator block of configs/synthesize/local-tiny.yaml: SmolLM2-135M, paper sampling, <= 96 tokens, one
    # guided sentence of reasoning before the score tag.
    return LLMEngineConfig(
        model="smollm2-135m", max_model_len=2048, batch_size=8, max_concurrent_batches=2, num_cpus=1,
        sampling=SamplingConfig(temperature=0.7, top_p=0.95, top_k=40, max_tokens=96, seed=0),
        structured_output=StructuredOutputConfig(regex="Reasoning: [^<\\n]{10,240}\\n<score>[1-5]</score>"),
    )


class AuditJobConfig(JobConfig):
    """`reasonembed audit-annotator`: score (judged-relevant, random non-relevant) pairs of a BEIR-layout benchmark
    with the annotation prompt, then report AUC, per-class score histograms and parse failures under
    ``<out>/<run_id>/audit/``."""

    FLAGS: ClassVar[dict[str, str]] = {
        "model": "annotator.model",
        "annotator": "annotator.model",
        "data": "data",
        "out": "out",
    }

    data: str = Field(
        "{data_dir}/beir/scifact",
        description="Benchmark folder in BEIR layout (corpus.jsonl, queries.jsonl, qrels.tsv or qrels/<split>.tsv). "
        "'{data_dir}' expands to $REASONEMBED_DATA_DIR (default ../shared/data). (--data)",
    )
    split: str = Field("test", description="Qrels split read when the folder has qrels/<split>.tsv (not qrels.tsv).")
    domain: str = Field(
        "scifact", description="Domain whose annotation profile (relevance definition, query and document types) "
        "the prompt uses: a built-in BRIGHT profile or a generic one, with `domain_profile` applied on top."
    )
    domain_profile: DomainProfileConfig | None = Field(
        None, description="Overrides of the domain's profile, as in synthesize's domain_profiles[<domain>] (None: the "
        "built-in or generic profile unchanged)."
    )
    annotator: LLMEngineConfig = Field(
        default_factory=_preset_annotator, description="The relevance annotator under audit (engine, sampling, "
        "structured output). (--model)"
    )
    annotate: AnnotateConfig = Field(
        default_factory=AnnotateConfig, description="Score pattern and valid range, as in synthesize's annotate stage."
    )
    relevant_min_score: int = Field(
        default_factory=lambda: FormatConfig().pos_min_score,
        description="The rule 'score >= this means relevant' whose accuracy is reported (default: the format "
        "stage's pos_min_score, 3).",
    )
    n_queries: int = Field(40, ge=1, description="Queries sampled (seeded) among those with a relevant judged doc.")
    positives_per_query: int = Field(
        1, ge=1, description="Judged-relevant documents (qrels score > 0) drawn per query (all if it has fewer)."
    )
    negatives_per_query: int = Field(
        1, ge=1, description="Random documents per query, drawn with a seeded RNG from the corpus minus every "
        "document judged for that query (any score)."
    )

    @field_validator("domain")
    @classmethod
    def _domain_name(cls, value: str) -> str:
        if not _DOMAIN_RE.match(value):
            raise ValueError(f"domain {value!r}: use letters, digits, '_', '-' or '.'")
        return value

    @model_validator(mode="after")
    def _threshold(self) -> AuditJobConfig:
        a = self.annotate
        if not a.min_score < self.relevant_min_score <= a.max_score:
            raise ValueError(f"relevant_min_score ({self.relevant_min_score}) must lie in "
                             f"({a.min_score}, {a.max_score}] (annotate.min_score, annotate.max_score]")
        return self
