"""Stage 3, reasoning-augmented relevance annotation (the ReasonEmbed paper's ReMixer, stage 3).

Pointwise: one request per (query, candidate) pair, id ``pair_id = h("pair", query_id, doc_id)`` (which also
seeds its vLLM sampling). The prompt carries the domain's relevance definition, query and document types, the
three reasoning steps and the 1-5 scale; the score is parsed strictly from the last ``<score>N</score>`` tag
(``annotate.score_pattern``).

Error rows (``synthesize/annotate/errors/``), kept with their ids and the raw response, never a silent -1:
``no_score_tag`` (e.g. cut off at max_tokens), ``score_not_integer``, ``score_out_of_range``, ``empty_output``, and
the engine's ``prompt_too_long`` / ``bad_input`` / ``engine_error``.

The paper's path is free text + strict parse. A random-weight tiny model almost never writes a valid tag, so the
tiny preset sets ``annotator.structured_output.regex`` (e.g. ``[\\s\\S]{0,200}<score>[1-5]</score>``): guided
decoding then guarantees the tag's shape and the same strict parser reads it.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.config.synthesize import AnnotateConfig
from reasonembed.input_fingerprint import model_input
from reasonembed.remixer.context import Context
from reasonembed.remixer.generate import QUERIES_REQUIRES, engine_identity, final_queries
from reasonembed.remixer.ids import content_hash
from reasonembed.remixer.llm_stage import LLMTask, run_llm_stage
from reasonembed.remixer.parsing import parse_score
from reasonembed.remixer.prompts import DomainProfile, annotation_prompt
from reasonembed.remixer.stage import POOL_COLUMNS, Requires, Stage, StageResult, read_input, read_pool
from reasonembed.schemas import error_schema, error_table

SCORE_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("query_id", pa.string()), ("doc_id", pa.string()), ("rank", pa.int32()),
    ("domain", pa.string()), ("shard", pa.string()), ("score", pa.int8()), ("num_generated_tokens", pa.int64()),
    ("truncated", pa.bool_()), ("response", pa.string()),
])
ERROR_SCHEMA = error_schema(("pair_id", pa.string()), ("query_id", pa.string()), ("doc_id", pa.string()),
                            ("rank", pa.int32()), ("domain", pa.string()), ("shard", pa.string()))
PAIR_COLUMNS = ("pair_id", "query_id", "doc_id", "rank", "domain", "shard", "query", "doc")
# What annotation requires of its inputs (``remixer.stage``; the queries': generate.QUERIES_REQUIRES).
ANNOTATE_REQUIRES: Requires = {
    "mine": {"query_id": "the query's id", "domain": "domain of the query", "shard": "shard of the source",
             "candidate_ids": "the query's candidate documents, in mining rank order"},
    "pool": POOL_COLUMNS,
}


class AnnotationMessages:
    """Picklable row -> annotation prompt."""

    def __init__(self, profiles: dict[str, DomainProfile], template: str | None = None):
        self.profiles, self.template = profiles, template

    def __call__(self, row: dict) -> str:
        return annotation_prompt(self.profiles[row["domain"]], row["query"], row["doc"], self.template)


def pair_rows(ctx: Context) -> pa.Table:
    """Every (query, candidate) pair of the finished mine stage, with the texts its prompt needs."""
    mine = read_input(ctx, "annotate", ANNOTATE_REQUIRES, "mine")
    queries = final_queries(ctx, "annotate")
    qtext = dict(zip(queries["query_id"].to_pylist(), queries["query"].to_pylist(), strict=True))
    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for domain in ctx.cfg.data.domains:
        part = mine.filter(pc.equal(mine["domain"], domain)) if mine.num_rows else mine
        if part.num_rows == 0:
            continue
        pt = read_pool(ctx, "annotate", ANNOTATE_REQUIRES, domain)
        dtext = dict(zip(pt["doc_id"].to_pylist(), pt["text"].to_pylist(), strict=True))
        for r in part.select(["query_id", "shard", "candidate_ids"]).to_pylist():
            for rank, doc_id in enumerate(r["candidate_ids"]):
                cols["pair_id"].append(content_hash("pair", r["query_id"], doc_id))
                cols["query_id"].append(r["query_id"])
                cols["doc_id"].append(doc_id)
                cols["rank"].append(rank)
                cols["domain"].append(domain)
                cols["shard"].append(r["shard"])
                cols["query"].append(qtext[r["query_id"]])
                cols["doc"].append(dtext[doc_id])
    schema = pa.schema([(c, pa.int32() if c == "rank" else pa.string()) for c in PAIR_COLUMNS])
    return pa.table(cols, schema=schema)


class ScoreParser:
    """Generated rows of one shard -> (scores, error rows), with the strict parser of ``parsing.parse_score``."""

    def __init__(self, cfg: AnnotateConfig):
        self.cfg = cfg

    def __call__(self, shard: str, out: pa.Table):
        good, bad = [], []
        for r in out.to_pylist():
            ids = {k: r[k] for k in ("pair_id", "query_id", "doc_id", "rank", "domain", "shard")}
            if r.get("error"):
                bad.append({**ids, "reason": r["error"], "detail": r.get("error_detail") or ""})
                continue
            text = r["generated_text"]
            score, reason = parse_score(text, self.cfg.score_pattern, self.cfg.min_score, self.cfg.max_score)
            if reason:
                detail = "generation hit max_tokens" if r["truncated"] else ""
                bad.append({**ids, "reason": reason, "detail": detail, "raw_text": text})
                continue
            good.append({**ids, "score": score, "num_generated_tokens": r["num_generated_tokens"],
                         "truncated": r["truncated"], "response": text if self.cfg.keep_text else None})
        good.sort(key=lambda x: x["pair_id"])
        bad.sort(key=lambda x: x["pair_id"])
        return pa.Table.from_pylist(good, schema=SCORE_SCHEMA), error_table(bad, ERROR_SCHEMA)


def _scores(out: pa.Table) -> dict:
    hist = Counter(out["score"].to_pylist()) if out.num_rows else Counter()
    total_tokens = int(pc.sum(out["num_generated_tokens"]).as_py() or 0) if out.num_rows else 0
    return {"score_histogram": {str(k): hist[k] for k in sorted(hist)}, "generated_tokens_total": total_tokens}


class AnnotateStage(Stage):
    """Stage 3: pointwise relevance annotation of every (query, candidate) pair (module docstring)."""

    name = "annotate"
    upstream = ("pool", "mine", "generate", "reason")
    requires = {**QUERIES_REQUIRES, **ANNOTATE_REQUIRES}
    retryable = True

    def settings(self, ctx: Context) -> list:
        return [ctx.cfg.annotate, engine_identity(ctx.cfg.annotator),
                {d: [p.relevance_definition, p.query_type, p.doc_type] for d, p in ctx.profiles.items()}]

    def own_inputs(self, ctx: Context) -> dict[str, str]:
        return model_input(ctx.cfg.annotator.model)

    def run(self, ctx: Context) -> StageResult:
        pairs = pair_rows(ctx)
        task = LLMTask(ctx.cfg.annotator, AnnotationMessages(ctx.profiles, ctx.cfg.annotate.prompt),
                       ScoreParser(ctx.cfg.annotate), id_column="pair_id",
                       keep_columns=["query_id", "doc_id", "rank", "domain", "shard"], part_id="pair_id",
                       error_id="pair_id")
        return run_llm_stage(ctx, self.name, pairs, task, _scores)


ANNOTATE = AnnotateStage()
