"""The end-of-run report: rows in/out and error counts per stage, tokens and tokens/s of the LLM stages, the score
histogram (also as a PNG), positives/negatives per query, and the triviality check: how many candidates written
anywhere (mine's candidate lists, annotate's scored pairs, format's positives and negatives) are their query's own
source document, by id or by identical text (it must be 0; see :func:`source_matches`).

Written to ``synthesize/report.json`` and ``synthesize/score_histogram.png``; returned as a dict by
``pipeline.run``. Token rates come from each LLM stage's manifest, i.e. from the run that finished the stage
(``shards_run`` says how much of the stage that run did).
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.remixer.context import STAGE_ROOT, Context
from reasonembed.storage import Location

LLM_STAGES = ("domain_filter", "generate", "reason", "annotate")
REPORT_STAGES = ("prepare", "pool", "domain_filter", "generate", "reason", "mine", "annotate", "format")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _same_text(ctx: Context) -> dict[tuple[str, str], set[str]]:
    """(domain, source doc id) -> ids of the domain's pool documents with exactly the source's text (the source
    itself included). Only pool texts as long as some source are hashed."""
    src = ctx.stage("prepare").read_parts(columns=["domain", "doc_id", "text"])
    pool = ctx.stage("pool").read_parts(columns=["domain", "doc_id", "text"])
    if src.num_rows == 0 or pool.num_rows == 0:
        return {}
    pool_lengths = pc.binary_length(pool["text"])
    lengths = pa.array(sorted(set(pc.binary_length(src["text"]).to_pylist())), pool_lengths.type)
    pool = pool.filter(pc.is_in(pool_lengths, value_set=lengths))
    by_text: dict[tuple[str, str], set[str]] = defaultdict(set)
    for dom, doc, text in zip(*(pool[c].to_pylist() for c in ("domain", "doc_id", "text")), strict=True):
        by_text[(dom, _digest(text))].add(doc)
    return {(dom, doc): by_text.get((dom, _digest(text)), set()) | {doc}
            for dom, doc, text in zip(*(src[c].to_pylist() for c in ("domain", "doc_id", "text")), strict=True)}


def source_matches(ctx: Context) -> dict[str, list[int]]:
    """Per stage, [candidates equal to their query's source document (same id or same text), candidates checked],
    over the rows actually written: mine candidate lists, annotate scored pairs, format positives + negatives."""
    same = _same_text(ctx)
    mine = ctx.stage("mine").read_parts(columns=["query_id", "domain", "source_doc_id", "candidate_ids"])

    def count(rows) -> list[int]:
        hits = total = 0
        for dom, src, cands in rows:
            equal = same.get((dom, src), {src})
            hits += sum(c in equal for c in cands)
            total += len(cands)
        return [hits, total]

    if mine.num_rows == 0:
        return {"mine": [0, 0], "annotate": [0, 0], "format": [0, 0]}
    cols = [mine[c].to_pylist() for c in ("domain", "source_doc_id", "candidate_ids")]
    out = {"mine": count(zip(*cols, strict=True))}
    source_of = dict(zip(mine["query_id"].to_pylist(), mine["source_doc_id"].to_pylist(), strict=True))
    ann = ctx.stage("annotate").read_parts(columns=["query_id", "domain", "doc_id"])
    out["annotate"] = count((d, source_of.get(q, ""), [doc]) for q, d, doc in
                            zip(*(ann[c].to_pylist() for c in ("query_id", "domain", "doc_id")), strict=True)) \
        if ann.num_rows else [0, 0]
    fmt = ctx.stage("format").read_parts(columns=["domain", "source_doc_id", "pos_ids", "neg_ids"])
    out["format"] = count((d, s, p + n) for d, s, p, n in
                          zip(*(fmt[c].to_pylist() for c in ("domain", "source_doc_id", "pos_ids", "neg_ids")),
                              strict=True)) if fmt.num_rows else [0, 0]
    return out


def build(ctx: Context) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for name in REPORT_STAGES:
        m = ctx.stage(name).read_manifest()
        if m is None:
            continue
        entry = {"rows_in": m.rows_in, "rows_out": m.rows_out, "rows_error": m.rows_error,
                 "errors_by_reason": m.errors_by_reason, "shards": m.shards, "wall_s": m.wall_s}
        if name in LLM_STAGES:
            entry.update({k: m.extra.get(k) for k in ("generated_tokens", "prompt_tokens", "tokens_per_s",
                                                        "steady_tokens_per_s", "llm_s", "first_output_s",
                                                        "shards_run", "shards_done_before")})
        stages[name] = entry
    ann = ctx.stage("annotate").read_manifest()
    fmt = ctx.stage("format").read_manifest()
    prep = ctx.stage("prepare").read_manifest()
    matches = source_matches(ctx)
    same, total = matches["mine"]
    hist = dict(ann.extra.get("score_histogram", {})) if ann else {}
    return {
        "run": ctx.run.uri,
        "stages": stages,
        "decontamination": {"gold_ids": prep.extra.get("gold_ids"), "removed": prep.extra.get("contaminated")}
        if prep else {},
        "score_histogram": hist,
        "annotation_errors": ann.rows_error if ann else 0,
        "samples": fmt.rows_out if fmt else 0,
        "pos_per_query": fmt.extra.get("mean_pos_per_query") if fmt else None,
        "neg_per_query": fmt.extra.get("mean_neg_per_query") if fmt else None,
        "dropped_no_pos": fmt.extra.get("dropped_no_pos", 0) if fmt else 0,
        "dropped_no_neg": fmt.extra.get("dropped_no_neg", 0) if fmt else 0,
        "candidates": total,
        # Over everything written (mine, annotate, format), by id or identical text: must be 0.
        "candidates_equal_to_source": sum(n for n, _ in matches.values()),
        "candidates_equal_to_source_by_stage": {k: n for k, (n, _) in matches.items()},
        "source_candidate_fraction": (same / total) if total else 0.0,
        "format_uri": ctx.stage("format").uri,
    }


def histogram_png(hist: dict[str, int], errors: int) -> bytes:
    """Bar chart of annotation scores (1-5) plus the error rows, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(k) for k in range(1, 6)] + ["error"]
    values = [int(hist.get(str(k), 0)) for k in range(1, 6)] + [errors]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["#b2182b", "#ef8a62", "#fddbc7", "#67a9cf", "#2166ac", "#999999"])
    ax.bar_label(bars)
    ax.set_xlabel("relevance score (>= 3: positive, <= 2: negative)")
    ax.set_ylabel("annotated pairs")
    ax.set_title("ReMixer annotation scores")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write(ctx: Context, report: dict[str, Any]) -> dict[str, Any]:
    """Store ``report`` as report.json and its score histogram as score_histogram.png next to the stages."""
    loc = Location(ctx.run.child(STAGE_ROOT), ctx.cfg.storage)
    report = {**report, "report_uri": loc.child("report.json"), "histogram_uri": loc.child("score_histogram.png")}
    loc.write_bytes("score_histogram.png", histogram_png(report["score_histogram"], report["annotation_errors"]))
    loc.write_json("report.json", report)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for logs and the CLI."""
    lines = []
    for name, s in report["stages"].items():
        line = f"{name:>13}: {s['rows_in']} in -> {s['rows_out']} out, {s['rows_error']} errors"
        if s.get("errors_by_reason"):
            line += f" {s['errors_by_reason']}"
        if s.get("generated_tokens"):
            line += (f", {s['generated_tokens']} tokens: {s['steady_tokens_per_s']} tok/s once the engine is up, "
                     f"{s['tokens_per_s']} tok/s with start-up")
        lines.append(line)
    by_stage = report.get("candidates_equal_to_source_by_stage", {})
    lines.append(f"scores {report['score_histogram']}, samples {report['samples']}, pos/query "
                 f"{report['pos_per_query']}, neg/query {report['neg_per_query']}, candidates equal to their source "
                 f"(id or text) {report['candidates_equal_to_source']} "
                 f"(mine {by_stage.get('mine', 0)}/{report['candidates']}, annotate {by_stage.get('annotate', 0)}, "
                 f"format {by_stage.get('format', 0)})")
    return lines
