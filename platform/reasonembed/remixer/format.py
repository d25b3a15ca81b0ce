"""Stage 4, formatting (the ReasonEmbed paper's ReMixer, stage 4): scored candidates -> training samples.

Per query, in mining rank order: score >= ``pos_min_score`` (3) -> positive, score <= ``neg_max_score`` (2) ->
negative; candidates whose annotation is an error row have no score and are left out (counted as ``unscored``).
Queries without a positive or without a negative are dropped (counted). ``train_group_size`` / ``batch_size`` are
per domain (leetcode 2/64, pony 64/2, others 16/8).

Columns: the canonical sample schema (``reasonembed.schemas.SAMPLE_SCHEMA``): the public release's ``prompt, query,
reasoning_query, pos, neg, train_group_size, batch_size`` (``schemas.RELEASE_COLUMNS``) plus our
``sample_id = h("sample", query_id), query_id, pos_ids, neg_ids, pos_scores, neg_scores, source_doc_id, domain,
shard, n_unscored``. The trainer reads both layouts.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.remixer.context import Context
from reasonembed.remixer.generate import QUERIES_REQUIRES, final_queries
from reasonembed.remixer.ids import content_hash
from reasonembed.remixer.stage import POOL_COLUMNS, Requires, Stage, StageResult
from reasonembed.schemas import SAMPLE_SCHEMA

# What formatting requires of its inputs (``remixer.stage``; the queries': generate.QUERIES_REQUIRES).
FORMAT_REQUIRES: Requires = {
    "mine": {"query_id": "the query's id", "shard": "shard of the source",
             "candidate_ids": "the query's candidate documents, in mining rank order"},
    "annotate": {"query_id": "the query's id", "doc_id": "the candidate's id", "score": "its relevance score"},
    "pool": POOL_COLUMNS,
}


def build_sample(q: dict, candidates: list[str], scores: dict[str, int], texts: dict[str, str], ctx: Context,
                 counts: Counter) -> dict | None:
    """One training sample, or None (counted in ``counts``) when the query lacks a positive or a negative."""
    f, p = ctx.cfg.format, ctx.profiles[q["domain"]]
    pos = [(d, scores[d]) for d in candidates if d in scores and scores[d] >= f.pos_min_score]
    neg = [(d, scores[d]) for d in candidates if d in scores and scores[d] <= f.neg_max_score]
    unscored = sum(d not in scores for d in candidates)
    counts["unscored_candidates"] += unscored
    if f.require_pos and not pos:
        counts["dropped_no_pos"] += 1
        return None
    if f.require_neg and not neg:
        counts["dropped_no_neg"] += 1
        return None
    return {
        "sample_id": content_hash("sample", q["query_id"]), "prompt": p.retrieval_instruction, "query": q["query"],
        "reasoning_query": q["reasoning_query"], "pos": [texts[d] for d, _ in pos], "neg": [texts[d] for d, _ in neg],
        "train_group_size": p.train_group_size, "batch_size": p.batch_size, "pos_ids": [d for d, _ in pos],
        "neg_ids": [d for d, _ in neg], "pos_scores": [s for _, s in pos], "neg_scores": [s for _, s in neg],
        "query_id": q["query_id"], "source_doc_id": q["source_doc_id"], "domain": q["domain"], "shard": q["shard"],
        "n_unscored": unscored,
    }


class FormatStage(Stage):
    """Stage 4: scored candidates -> training samples (module docstring)."""

    name = "format"
    upstream = ("pool", "mine", "annotate", "generate", "reason")
    requires = {**QUERIES_REQUIRES, **FORMAT_REQUIRES}

    def settings(self, ctx: Context) -> list:
        return [ctx.cfg.format, {d: [p.retrieval_instruction, p.train_group_size, p.batch_size]
                                 for d, p in ctx.profiles.items()}]

    def run(self, ctx: Context) -> StageResult:
        stage = ctx.stage(self.name)
        shards = sorted(ctx.stage("prepare").done_shards())
        pending = [s for s in shards if s not in stage.done_shards()]
        mine = self.read_input(ctx, "mine")
        scored = self.read_input(ctx, "annotate", columns=["query_id", "doc_id", "score"])
        scores: dict[str, dict[str, int]] = defaultdict(dict)
        for qid, did, s in zip(*(scored[c].to_pylist() for c in ("query_id", "doc_id", "score")), strict=True):
            scores[qid][did] = s
        queries = {r["query_id"]: r for r in final_queries(ctx, self.name).to_pylist()}
        texts: dict[str, dict[str, str]] = {}
        counts: Counter = Counter()
        # Every shard is rebuilt (cheap) so the counts cover the whole stage; only pending shards are written.
        for s in shards:
            domain = s.rsplit("-", 1)[0]
            if domain not in texts:
                pt = self.read_pool(ctx, domain)
                texts[domain] = dict(zip(pt["doc_id"].to_pylist(), pt["text"].to_pylist(), strict=True))
            rows = []
            part = mine.filter(pc.equal(mine["shard"], s)) if mine.num_rows else mine
            for r in part.select(["query_id", "candidate_ids"]).to_pylist():
                sample = build_sample(queries[r["query_id"]], r["candidate_ids"], scores.get(r["query_id"], {}),
                                      texts[domain], ctx, counts)
                if sample is not None:
                    rows.append(sample)
            rows.sort(key=lambda x: x["sample_id"])
            if s in pending:
                stage.write_part(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), s)
        return _result(mine.num_rows, counts, stage.read_parts())


FORMAT = FormatStage()


def _result(rows_in: int, counts: Counter, out: pa.Table) -> StageResult:
    """The stage's result: its counts plus positives/negatives per query and samples per domain of ``out``."""
    n_pos = pc.list_value_length(out["pos_ids"]).to_pylist() if out.num_rows else []
    n_neg = pc.list_value_length(out["neg_ids"]).to_pylist() if out.num_rows else []
    return StageResult(rows_in=rows_in, rows_out=out.num_rows, extra={
        **dict(counts),
        "mean_pos_per_query": round(sum(n_pos) / len(n_pos), 3) if n_pos else 0.0,
        "mean_neg_per_query": round(sum(n_neg) / len(n_neg), 3) if n_neg else 0.0,
        "samples_by_domain": dict(Counter(out["domain"].to_pylist())) if out.num_rows else {}})
