"""Config of ReMixer synthesis (`reasonembed synthesize`, jobs/synthesize.py): corpus -> training samples.

Stages (the paper's ReMixer; each has its own section below and writes ``<out>/<run_id>/synthesize/<stage>/``):
``prepare`` (length filter, dedup, decontamination, optional LLM domain filter, seeded sampling) -> ``generate``
(conditioned queries, then the reasoning query q') -> ``mine`` (top-k candidates with the platform's encoder and
FAISS, source removed) -> ``annotate`` (pointwise 1-5 relevance scores) -> ``format`` (pos/neg samples).

Every number defaults to the paper's value (ReasonEmbed, arXiv 2510.08252, and its public scripts); where the
paper publishes nothing (e.g. the q' prompt, generation max_tokens) the default is ours and the description says so.
Sizing arithmetic: annotation requests = sources x queries_per_doc x mine.keep (paper: 10,000 x 1 x 100 = 1 M per
domain); each replica of ``annotator`` serves ``batch_size x max_concurrent_batches`` requests at a time.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from reasonembed.config.base import JobConfig, StrictModel
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.encode import EncodeEngineConfig
from reasonembed.config.llm import LLMEngineConfig, SamplingConfig

_DOMAIN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class WeightedChoice(StrictModel):
    """One option of a weighted draw (e.g. a query length bucket)."""

    label: str = Field(description="Text inserted into the prompt, e.g. '200 to 300 words'.", min_length=1)
    weight: float = Field(gt=0, description="Relative weight of this option.")


def _paper_lengths() -> list[WeightedChoice]:
    # The paper's stage 1: <100 words x1, 100-200 x2, 200-300 x3, 300-400 x3, 400-500 x2, >=500 x1.
    pairs = [("less than 100 words", 1), ("100 to 200 words", 2), ("200 to 300 words", 3),
             ("300 to 400 words", 3), ("400 to 500 words", 2), ("at least 500 words", 1)]
    return [WeightedChoice(label=a, weight=w) for a, w in pairs]


def _paper_levels() -> list[WeightedChoice]:
    # The paper's stage 1: high school x1, college x2, PhD x2.
    return [WeightedChoice(label="high school", weight=1), WeightedChoice(label="college", weight=2),
            WeightedChoice(label="PhD", weight=2)]


class DecontaminationConfig(StrictModel):
    """Which documents may never be a source (or candidate): the gold documents of a benchmark's test queries."""

    benchmark: Literal["bright", "beir", "none"] = Field(
        "bright",
        description="bright: every `gold_ids` entry (see id_fields) of <path>/<task>/queries.jsonl; beir: every doc "
        "judged relevant (score > 0) in <path>/qrels.tsv or <path>/qrels/test.tsv; none: no decontamination.",
    )
    path: str | None = Field(
        "{data_dir}/bright",
        description="Benchmark folder. '{data_dir}' expands to $REASONEMBED_DATA_DIR (default ../shared/data). "
        "A missing folder is an error, never a silent skip.",
    )
    tasks: list[str] | None = Field(
        None, description="BRIGHT tasks whose gold ids are removed (None: every task folder under path)."
    )
    id_fields: list[str] = Field(
        default_factory=lambda: ["gold_ids"],
        description="Query fields listing gold doc ids (BRIGHT short setting: gold_ids; add gold_ids_long for "
        "the long-document corpora).",
    )
    extra_ids: list[str] = Field(default_factory=list, description="More doc ids to remove.")
    apply_to_pool: bool = Field(
        True,
        description="Also remove them from the mining pool, so a test gold document never becomes a training "
        "positive or negative either (the paper states only the source rule; this is the stricter reading).",
    )


class SynthDataConfig(StrictModel):
    """The corpus to synthesize from."""

    corpus: str = Field(
        "",
        description="A BEIR-layout folder (corpus.jsonl), a .jsonl/.parquet file, or a folder with one sub-folder "
        "per domain (<corpus>/<domain>/corpus.jsonl, the BRIGHT layout); local path or s3:// URI. (--data)",
    )
    domains: list[str] = Field(
        default_factory=lambda: ["biology"],
        description="Domain names. They pick the prompts (built-in profiles for the 12 BRIGHT tasks, a generic "
        "one otherwise) and, with a multi-domain folder, the sub-folders to read.",
        min_length=1,
    )
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="File format (auto: by extension).")
    id_field: str = Field("id", description="Column with the document id ('_id' is accepted as a fallback).")
    text_field: str = Field("text", description="Column with the document text ('content' is accepted too).")
    title_field: str | None = Field(
        "title", description="Optional title column, prepended unless the text already starts with it (BEIR rule)."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N documents of each domain (smoke runs).")
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, description="Benchmark gold documents to keep out."
    )

    @field_validator("domains")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for d in value:
            if not _DOMAIN_RE.match(d):
                raise ValueError(f"domain {d!r}: use letters, digits, '_', '-' or '.' (it names files)")
        if len(set(value)) != len(value):
            raise ValueError(f"domains repeat: {value}")
        return value


class DomainProfileConfig(StrictModel):
    """Overrides of a domain's prompt profile (None keeps the built-in or generic value)."""

    label: str | None = Field(None, description="Human name of the domain, e.g. 'Biology'.")
    generation_instruction: str | None = Field(
        None, description="Task instruction of the query generator; '{language}' is filled in."
    )
    output_name: str | None = Field(None, description="What the generator writes, e.g. 'StackExchange post'.")
    query_type: str | None = Field(None, description="Query type named in the annotation prompt.")
    doc_type: str | None = Field(None, description="Document type named in the annotation prompt.")
    relevance_definition: str | None = Field(None, description="Per-domain relevance definition for annotation.")
    retrieval_instruction: str | None = Field(
        None, description="Query instruction for mining and the sample's `prompt` field (BRIGHT's per-task one)."
    )
    train_group_size: int | None = Field(None, ge=2, description="Passages per query during training.")
    batch_size: int | None = Field(None, ge=1, description="Queries per device per training step.")


class DomainFilterConfig(StrictModel):
    """Optional LLM yes/no 'is this passage about <domain>?' filter (off by default, as in the paper)."""

    enabled: bool = Field(False, description="Ask the generator LLM whether each eligible document fits the domain.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=4, seed=0),
        description="Sampling for the yes/no answer (greedy, a few tokens).",
    )
    guided: bool = Field(
        False, description="Constrain the answer to exactly 'Yes' or 'No' (structured choice); needed for tiny models."
    )


class PrepareConfig(StrictModel):
    """Stage 0: source preparation."""

    min_chars: int = Field(200, ge=0, description="Shortest source document, in characters (paper: 200).")
    max_chars: int = Field(5000, ge=1, description="Longest source document, in characters (paper: 5000).")
    dedup: bool = Field(True, description="Drop exact duplicate texts (the smallest doc id of a group is kept).")
    n_per_domain: int = Field(10_000, ge=1, description="Source documents sampled per domain (paper: 10,000).")
    sample_seed: int | None = Field(None, description="Seed of the source sampling (None: the job seed, 42).")
    rows_per_shard: int = Field(
        64, ge=1, description="Sources per shard. A shard is the unit of resume in every later stage (its queries, "
        "candidates, annotations and samples share the shard id)."
    )
    domain_filter: DomainFilterConfig = Field(default_factory=DomainFilterConfig, description="LLM domain filter.")

    @model_validator(mode="after")
    def _range(self) -> PrepareConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class GenerateConfig(StrictModel):
    """Stage 1: conditioned query generation (sampling lives in ``generator.sampling``)."""

    queries_per_doc: int = Field(1, ge=1, description="Queries generated per source document (paper: 1).")
    prompt: str | None = Field(
        None, description="Prompt template with {instruction}, {text}, {output_name}, {length}, {education}; None: "
        "the platform's default (remixer/prompts.py). Small models need shorter prompts than the default's rules.",
    )
    language: str = Field("English", description="Language of the generated queries.")
    length_buckets: list[WeightedChoice] = Field(
        default_factory=_paper_lengths, description="Target query lengths and their weights (paper: 1,2,3,3,2,1).",
        min_length=1,
    )
    education_levels: list[WeightedChoice] = Field(
        default_factory=_paper_levels, description="Education levels and their weights (paper: 1,2,2).", min_length=1
    )


class ReasoningQueryConfig(StrictModel):
    """The reasoning query q' (the paper's prompt is unpublished; ours is in remixer/prompts.py)."""

    enabled: bool = Field(True, description="Generate q' for every query (RI-InfoNCE needs it).")
    prompt: str | None = Field(
        None, description="Prompt template with {query}, {query_type}, {label}; None: the platform's default."
    )
    sampling: SamplingConfig | None = Field(
        None, description="Sampling for q' (None: generator.sampling with its seed)."
    )


class MineConfig(StrictModel):
    """Stage 2: candidate mining with the platform's encoder (Ray Data actor pool) and FAISS."""

    embedder: EmbedderConfig = Field(
        default_factory=lambda: EmbedderConfig(
            model="Alibaba-NLP/gte-Qwen2-7B-instruct", pooling="last_token", max_length=8192, normalize=True
        ),
        description="Retriever (paper: gte-Qwen2-7B-instruct, last-token pooling, max length 8192, normalized). The "
        "per-domain retrieval instruction is applied to queries.",
    )
    engine: EncodeEngineConfig = Field(
        default_factory=EncodeEngineConfig, description="Actor pool that encodes the domain corpus and the queries."
    )
    search_top_k: int = Field(1000, ge=1, description="Hits retrieved per query from the whole domain corpus (paper: 1000).")
    keep: int = Field(100, ge=1, description="Candidates kept per query after removing the source (paper: 100).")
    selection: Literal["reference", "skip_source"] = Field(
        "reference",
        description="How the `keep` candidates come out of the hits. reference (the paper's reference procedure): take "
        "the top `keep` hits, remove the source, then fill back to `keep` with hits drawn at random (seeded by query "
        "id) from the rest of the top `search_top_k`; skip_source: remove the source from the hits first and keep "
        "the next best hit instead (no random draw).",
    )
    pad_random: bool = Field(
        True, description="Pad with random pool documents (seeded by query id) when the hits run out before `keep`."
    )

    @model_validator(mode="after")
    def _keep(self) -> MineConfig:
        if self.keep > self.search_top_k:
            raise ValueError(f"keep ({self.keep}) > search_top_k ({self.search_top_k})")
        return self


class AnnotateConfig(StrictModel):
    """Stage 3: pointwise relevance annotation (sampling and structured output live in ``annotator``)."""

    score_pattern: str = Field(
        r"<score>\s*(\d+)\s*</score>", description="Regex whose group 1 is the score (the last match counts)."
    )
    prompt: str | None = Field(
        None, description="Prompt template with {relevance_definition}, {query_type}, {doc_type}, {query}, {doc}; "
        "None: the platform's default (remixer/prompts.py), which follows the paper's three steps.",
    )
    min_score: int = Field(1, description="Lowest valid score.")
    max_score: int = Field(5, description="Highest valid score.")
    keep_text: bool = Field(
        False, description="Keep the annotator's full response with each scored pair (error rows always keep it)."
    )

    @field_validator("score_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from exc
        if compiled.groups < 1:
            raise ValueError("needs a capture group for the score")
        return value


class FormatConfig(StrictModel):
    """Stage 4: scores -> training samples."""

    pos_min_score: int = Field(3, description="Scores >= this make a positive (paper: 3).")
    neg_max_score: int = Field(2, description="Scores <= this make a negative (paper: 1-2).")
    require_pos: bool = Field(True, description="Drop queries without a positive (paper: yes).")
    require_neg: bool = Field(True, description="Drop queries without a negative (paper: yes).")

    @model_validator(mode="after")
    def _order(self) -> FormatConfig:
        if self.neg_max_score >= self.pos_min_score:
            raise ValueError(f"neg_max_score ({self.neg_max_score}) must be < pos_min_score ({self.pos_min_score})")
        return self


def _paper_generator() -> LLMEngineConfig:
    # Qwen2.5-72B-Instruct, T=1.0, top_p=0.6. max_tokens is not published: 2048 covers the ">= 500 words" bucket.
    return LLMEngineConfig(
        model="Qwen/Qwen2.5-72B-Instruct", max_model_len=8192,
        sampling=SamplingConfig(temperature=1.0, top_p=0.6, max_tokens=2048, seed=0),
    )


def _paper_annotator() -> LLMEngineConfig:
    # The ReasonEmbed annotator: T=0.7, top_p=0.95, top_k=40, <= 2048 new tokens, thinking off.
    return LLMEngineConfig(
        model="hanhainebula/reason-embed-annotator-qwen3-8b-0928", max_model_len=16384,
        chat_template_kwargs={"enable_thinking": False},
        sampling=SamplingConfig(temperature=0.7, top_p=0.95, top_k=40, max_tokens=2048, seed=0),
    )


class SynthesizeJobConfig(JobConfig):
    """`reasonembed synthesize`: a document corpus -> ReasonEmbed training samples, resumable and exactly-once."""

    # Boolean flags (no value): `--retry-errors` sets retry_errors=true.
    SWITCHES: ClassVar[dict[str, str]] = {"retry_errors": "retry_errors", "overwrite": "overwrite"}
    FLAGS: ClassVar[dict[str, str]] = {
        "model": "generator.model",
        "generator": "generator.model",
        "annotator": "annotator.model",
        "miner": "mine.embedder.model",
        "data": "data.corpus",
        "out": "out",
    }

    data: SynthDataConfig = Field(default_factory=SynthDataConfig, description="Corpus, domains, decontamination.")
    domain_profiles: dict[str, DomainProfileConfig] = Field(
        default_factory=dict, description="Per-domain overrides of the prompt profile and training group settings."
    )
    generator: LLMEngineConfig = Field(
        default_factory=_paper_generator, description="Query generator (also writes q' and runs the domain filter)."
    )
    annotator: LLMEngineConfig = Field(default_factory=_paper_annotator, description="Relevance annotator.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Stage 0 settings.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Stage 1 settings.")
    reasoning: ReasoningQueryConfig = Field(default_factory=ReasoningQueryConfig, description="q' settings.")
    mine: MineConfig = Field(default_factory=MineConfig, description="Stage 2 settings.")
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig, description="Stage 3 settings.")
    format: FormatConfig = Field(default_factory=FormatConfig, description="Stage 4 settings.")
    overwrite: bool = Field(
        False, description="Redo stages started under a different config, or made from inputs that changed since "
        "(corpus, benchmark or model files, upstream stages), instead of refusing to mix them. (--overwrite)",
    )
    retry_errors: bool = Field(
        False,
        description="Re-send the error rows (engine errors, unparseable outputs, ...) of the finished shards of the "
        "LLM stages (generate, reason, annotate) whose config and inputs are unchanged: rows that now succeed move "
        "into the parts, rows that fail again stay error rows, each exactly once; the stage manifest records "
        "rows_retried and rows_recovered. Stages downstream of a retried stage then redo only the shards whose rows "
        "changed (a stage changed any other way is still refused without overwrite). Sampling is seeded per row, so "
        "a deterministic failure fails again; the domain filter's errors are not retried. (--retry-errors)",
    )
    batch_invariant: bool = Field(
        True,
        description="Make each generated text independent of how requests were batched, so shards re-done after a "
        "kill are byte-identical to an uninterrupted run. GPU: vLLM's batch-invariant kernels "
        "(VLLM_BATCH_INVARIANT=1). CPU: one sequence per engine step, no prefix caching, no chunked prefill. It costs "
        "throughput; false keeps exactly-once (no row lost or duplicated) but a re-done shard may differ where "
        "batched float arithmetic flips a sampled token.",
    )
    share_engines: bool = Field(
        True,
        description="One vLLM engine per model (and engine settings) for the whole run: generate, reason and annotate "
        "reuse it instead of each starting their own (reasonembed.llm.engine_pool). Engines then hold their CPUs/GPUs "
        "until the run ends, mining included; false gives each LLM stage its own engine, released when it finishes "
        "(e.g. one GPU that the miner needs too).",
    )
    stop_after: Literal["prepare", "generate", "reason", "mine", "annotate"] | None = Field(
        None, description="Stop after this stage (e.g. inspect sources or queries before paying for annotation)."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> SynthesizeJobConfig:
        unknown = sorted(set(self.domain_profiles) - set(self.data.domains))
        if unknown:
            raise ValueError(f"domain_profiles: {unknown} are not in data.domains {self.data.domains}")
        a = self.annotate
        if not a.min_score <= self.format.neg_max_score < self.format.pos_min_score <= a.max_score:
            raise ValueError(
                f"need annotate.min_score <= format.neg_max_score < format.pos_min_score <= annotate.max_score, got "
                f"{a.min_score}, {self.format.neg_max_score}, {self.format.pos_min_score}, {a.max_score}"
            )
        return self
