"""Stage 1, conditioned query generation, and the reasoning query q' (the paper's stage 1).

Generate (``synthesize/generate``): one request per (source, j < queries_per_doc) with id
``gen_id = h("gen", domain, doc_id, j)``. Its target length and education level are drawn from
``random.Random(h(seed, gen_id))`` with the configured weights (paper: lengths 1,2,3,3,2,1; levels 1,2,2), and its
vLLM seed derives from ``gen_id``. Outputs are cleaned (surrounding quotes and code fences) and get
``query_id = h("query", domain, query)``. Empty outputs and engine errors are error rows.

Dedup: queries with equal ``query_id`` (same domain and text) collapse to the one with the smallest ``gen_id``;
:func:`unique_queries` applies this to the finished generate stage, so it is deterministic.

Reason (``synthesize/reason``): q' for every unique query, with a configurable prompt (ours by default: the paper's
is unpublished) and the generator LLM. A query whose q' fails is an error row and does not go on to mining.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.config.llm import LLMEngineConfig
from reasonembed.input_fingerprint import model_input
from reasonembed.remixer.context import Context
from reasonembed.remixer.ids import content_hash, row_rng, weighted_pick
from reasonembed.remixer.llm_stage import LLMTask, run_llm_stage
from reasonembed.remixer.parsing import parse_query
from reasonembed.remixer.prompts import DomainProfile, generation_prompt, reasoning_prompt
from reasonembed.remixer.stage import Requires, Stage, StageResult, read_input
from reasonembed.schemas import error_schema, error_table

QUERY_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("gen_id", pa.string()), ("domain", pa.string()), ("source_doc_id", pa.string()),
    ("shard", pa.string()), ("query", pa.string()), ("length", pa.string()), ("education", pa.string()),
    ("num_generated_tokens", pa.int64()), ("truncated", pa.bool_()),
])
REASON_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("domain", pa.string()), ("shard", pa.string()), ("reasoning_query", pa.string()),
    ("num_generated_tokens", pa.int64()), ("truncated", pa.bool_()),
])
# Error rows of generate and reason (``row_id``: the request id, gen_id or query_id).
ERROR_SCHEMA = error_schema(("row_id", pa.string()), ("domain", pa.string()), ("source_doc_id", pa.string()),
                            ("shard", pa.string()))


# What each stage requires of its inputs (``remixer.stage``).
GENERATE_REQUIRES: Requires = {"prepare": {
    "domain": "domain of the source document", "doc_id": "source document id", "text": "source document text",
    "shard": "shard of the source",
}}
QUERY_COLUMNS = {
    "query_id": "h('query', domain, query)", "gen_id": "the generation request's id (dedup keeps the smallest)",
    "domain": "domain of the query", "source_doc_id": "the document the query was generated from",
    "shard": "shard of the source", "query": "the generated query",
}
REASON_REQUIRES: Requires = {"generate": QUERY_COLUMNS}
# What final_queries (the queries mine, annotate and format use) requires of generate and reason.
QUERIES_REQUIRES: Requires = {"generate": QUERY_COLUMNS, "reason": {
    "query_id": "the query's id", "reasoning_query": "the reasoning-intensive rewrite q'",
}}


def reason_engine(ctx: Context) -> LLMEngineConfig:
    s = ctx.cfg.reasoning.sampling
    return ctx.cfg.generator if s is None else ctx.cfg.generator.model_copy(update={"sampling": s})


def engine_identity(engine: LLMEngineConfig) -> dict:
    """Engine fields that change outputs (placement and throughput knobs do not)."""
    return engine.model_dump(mode="json", include={"model", "max_model_len", "dtype", "seed", "chat_template_kwargs",
                                                   "sampling", "structured_output"})


class GenerationMessages:
    """Picklable row -> stage 1 prompt."""

    def __init__(self, profiles: dict[str, DomainProfile], language: str, template: str | None = None):
        self.profiles, self.language, self.template = profiles, language, template

    def __call__(self, row: dict) -> str:
        return generation_prompt(self.profiles[row["domain"]], row["text"], row["length"], row["education"],
                                 self.language, self.template)


class ReasoningMessages:
    """Picklable row -> q' prompt."""

    def __init__(self, profiles: dict[str, DomainProfile], template: str | None):
        self.profiles, self.template = profiles, template

    def __call__(self, row: dict) -> str:
        return reasoning_prompt(self.profiles[row["domain"]], row["query"], self.template)


def generation_requests(ctx: Context, sources: pa.Table) -> pa.Table:
    """One request row per (source, j) with its sampled length bucket and education level."""
    g = ctx.cfg.generate
    lengths = [b.label for b in g.length_buckets], [b.weight for b in g.length_buckets]
    levels = [b.label for b in g.education_levels], [b.weight for b in g.education_levels]
    rows = []
    for src in sources.to_pylist():
        for j in range(g.queries_per_doc):
            gen_id = content_hash("gen", src["domain"], src["doc_id"], j)
            rng = row_rng(ctx.seed, "gen", gen_id)
            rows.append({"gen_id": gen_id, "domain": src["domain"], "source_doc_id": src["doc_id"],
                         "text": src["text"], "shard": src["shard"], "length": weighted_pick(rng, *lengths),
                         "education": weighted_pick(rng, *levels)})
    schema = pa.schema([(k, pa.string()) for k in
                        ("gen_id", "domain", "source_doc_id", "text", "shard", "length", "education")])
    return pa.Table.from_pylist(rows, schema=schema)


def _error(r: dict, row_id: str, reason: str, detail: str, raw: str) -> dict:
    return {"row_id": row_id, "domain": r["domain"], "source_doc_id": r.get("source_doc_id", ""),
            "shard": r["shard"], "reason": reason, "detail": detail, "raw_text": raw}


class QueryParser:
    """Picklable ``(shard, generated rows) -> (rows, errors)`` for generate and reason: binds each domain's labels
    (output name, query type), which the cleaner strips when a model prefixes its answer with them."""

    def __init__(self, profiles: dict[str, DomainProfile], post):
        self.labels = {d: (p.output_name, p.query_type) for d, p in profiles.items()}
        self.post = post

    def __call__(self, shard: str, out: pa.Table):
        return self.post(shard, out, self.labels)


def _parsed_rows(out: pa.Table, id_key: str, empty_detail: str, to_row, schema: pa.Schema,
                 labels: dict[str, tuple[str, ...]]):
    """Split an LLM stage's output into (good rows, error rows): engine errors and texts that parse to nothing
    become error rows with the raw text kept; ``to_row(r, text)`` builds a good row. Both sorted by id."""
    good, bad = [], []
    for r in out.to_pylist():
        if r.get("error"):
            bad.append(_error(r, r[id_key], r["error"], r.get("error_detail") or "", ""))
            continue
        text, reason = parse_query(r["generated_text"], labels.get(r["domain"], ()))
        if reason:
            bad.append(_error(r, r[id_key], reason, empty_detail, r["generated_text"]))
            continue
        good.append(to_row(r, text))
    good.sort(key=lambda x: x[id_key])
    bad.sort(key=lambda x: x["row_id"])
    return pa.Table.from_pylist(good, schema=schema), error_table(bad, ERROR_SCHEMA)


def _post_generate(shard: str, out: pa.Table, labels: dict[str, tuple[str, ...]]):
    def row(r: dict, query: str) -> dict:
        return {"query_id": content_hash("query", r["domain"], query), "gen_id": r["gen_id"],
                "domain": r["domain"], "source_doc_id": r["source_doc_id"], "shard": r["shard"], "query": query,
                "length": r["length"], "education": r["education"],
                "num_generated_tokens": r["num_generated_tokens"], "truncated": r["truncated"]}

    return _parsed_rows(out, "gen_id", "nothing left after cleaning", row, QUERY_SCHEMA, labels)


def _sums(out: pa.Table) -> dict:
    return {"generated_tokens_total": _sum(out, "num_generated_tokens"), "truncated": _sum(out, "truncated")}


class GenerateStage(Stage):
    """Stage 1: conditioned query generation (module docstring)."""

    name = "generate"
    upstream = ("prepare",)
    requires = GENERATE_REQUIRES
    retryable = True

    def settings(self, ctx: Context) -> list:
        c = ctx.cfg
        return [c.generate, engine_identity(c.generator), c.seed,
                {d: [p.generation_instruction, p.output_name] for d, p in ctx.profiles.items()}]

    def own_inputs(self, ctx: Context) -> dict[str, str]:
        return model_input(ctx.cfg.generator.model)

    def run(self, ctx: Context) -> StageResult:
        sources = self.read_input(ctx, "prepare")
        if sources.num_rows == 0:
            raise RuntimeError("generate: the prepare stage sampled no source documents (see its manifest)")
        requests = generation_requests(ctx, sources)
        task = LLMTask(ctx.cfg.generator,
                       GenerationMessages(ctx.profiles, ctx.cfg.generate.language, ctx.cfg.generate.prompt),
                       QueryParser(ctx.profiles, _post_generate), id_column="gen_id",
                       keep_columns=["domain", "source_doc_id", "shard", "length", "education"],
                       part_id="gen_id", error_id="row_id")
        return run_llm_stage(ctx, self.name, requests, task,
                             lambda out: {"duplicate_queries": unique_queries(out)[1], **_sums(out)})


GENERATE = GenerateStage()


def unique_queries(queries: pa.Table) -> tuple[pa.Table, int]:
    """Keep one row per query_id (the smallest gen_id); returns (table sorted by query_id, number dropped)."""
    if queries.num_rows == 0:
        return queries, 0
    t = queries.sort_by([("query_id", "ascending"), ("gen_id", "ascending")])
    qids = t["query_id"].to_pylist()
    first = [i for i in range(len(qids)) if i == 0 or qids[i] != qids[i - 1]]
    return t.take(pa.array(first, pa.int64())), t.num_rows - len(first)


def _post_reason(shard: str, out: pa.Table, labels: dict[str, tuple[str, ...]]):
    def row(r: dict, text: str) -> dict:
        return {"query_id": r["query_id"], "domain": r["domain"], "shard": r["shard"], "reasoning_query": text,
                "num_generated_tokens": r["num_generated_tokens"], "truncated": r["truncated"]}

    return _parsed_rows(out, "query_id", "empty reasoning query", row, REASON_SCHEMA, labels)


class ReasonStage(Stage):
    """The reasoning query q' of every unique query (module docstring); runs when ``reasoning.enabled``."""

    name = "reason"
    upstream = ("generate",)
    requires = REASON_REQUIRES
    retryable = True

    def enabled(self, ctx: Context) -> bool:
        return ctx.cfg.reasoning.enabled

    def settings(self, ctx: Context) -> list:
        return [ctx.cfg.reasoning, engine_identity(reason_engine(ctx)),
                {d: [p.query_type, p.label] for d, p in ctx.profiles.items()}]

    def own_inputs(self, ctx: Context) -> dict[str, str]:
        return model_input(reason_engine(ctx).model)

    def run(self, ctx: Context) -> StageResult:
        queries, _ = unique_queries(self.read_input(ctx, "generate"))
        rows = queries.select(["query_id", "domain", "source_doc_id", "shard", "query"])
        task = LLMTask(reason_engine(ctx), ReasoningMessages(ctx.profiles, ctx.cfg.reasoning.prompt),
                       QueryParser(ctx.profiles, _post_reason), id_column="query_id",
                       keep_columns=["domain", "source_doc_id", "shard"], part_id="query_id", error_id="row_id")
        return run_llm_stage(ctx, self.name, rows, task, _sums)


REASON = ReasonStage()


def final_queries(ctx: Context, stage: str) -> pa.Table:
    """Unique queries joined with q' (when enabled; queries whose q' failed are left out): the mining input, read
    for ``stage`` (whose name the required-column check reports)."""
    queries, _ = unique_queries(read_input(ctx, stage, QUERIES_REQUIRES, "generate"))
    if not ctx.cfg.reasoning.enabled:
        return queries.append_column("reasoning_query", pa.array([None] * queries.num_rows, pa.string()))
    reason = read_input(ctx, stage, QUERIES_REQUIRES, "reason", columns=["query_id", "reasoning_query"])
    if reason.num_rows == 0:
        return queries.append_column("reasoning_query", pa.array([], pa.string())).slice(0, 0)
    return queries.join(reason, "query_id", join_type="inner").sort_by("query_id")


def _sum(t: pa.Table, col: str) -> int:
    return int(pc.sum(t[col]).as_py() or 0) if t.num_rows else 0
