"""`reasonembed audit-annotator`: how well the relevance annotator separates a benchmark's judged-relevant documents
from random non-relevant ones, on the benchmark's own qrels.

Pairs (seeded, :func:`sample_pairs`): ``n_queries`` queries drawn among those with a judged-relevant document in the
corpus; per query ``positives_per_query`` documents with qrels score > 0 and ``negatives_per_query`` random corpus
documents that are not judged for that query at all. Every pair is scored with the annotate stage's own prompt
(``annotate.AnnotationMessages`` -> ``prompts.annotation_prompt`` with ``prompts.profile_for``), its pair id
(``h("pair", query_id, doc_id)``, which seeds sampling) and its strict parser (``parsing.parse_score``).

AUC is the Mann-Whitney statistic over the parsed pairs, with P relevant scores p_i and N non-relevant scores n_j::

    AUC = (1 / (P * N)) * sum_i sum_j ( [p_i > n_j] + 1/2 * [p_i == n_j] )

i.e. the probability that a random relevant pair scores higher than a random non-relevant one, ties counting 1/2
(0.5 = chance, 1 = perfect separation, 0 = perfectly reversed). It is near chance when |AUC - 0.5| < 0.05.

Written to ``<out>/<run_id>/audit/``: ``report.json``, ``report.md``, ``pairs.parquet`` (every pair, its score or
error and the response text), ``errors.parquet`` (every failed pair with reason and raw text; never dropped) and
``scores.png`` (the two classes' score histograms side by side).
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from reasonembed.config.audit import AuditJobConfig
from reasonembed.data.types import DataError, RetrievalTask
from reasonembed.remixer.ids import content_hash
from reasonembed.schemas import error_schema, error_table

log = logging.getLogger("reasonembed.remixer.audit")

RELEVANT, NON_RELEVANT = "relevant", "non_relevant"
CLASSES = (RELEVANT, NON_RELEVANT)
NEAR_CHANCE = 0.05
MISSING_OUTPUT = "missing_output"
PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("query_id", pa.string()), ("doc_id", pa.string()), ("label", pa.string()),
    ("qrel", pa.int32()), ("domain", pa.string()), ("query", pa.string()), ("doc", pa.string()),
])
RESULT_FIELDS = [("score", pa.int8()), ("error", pa.string()), ("error_detail", pa.string()),
                 ("response", pa.string()), ("truncated", pa.bool_()), ("num_generated_tokens", pa.int64())]
ERROR_SCHEMA = error_schema(*((c, pa.string()) for c in ("pair_id", "query_id", "doc_id", "label")))


def auc(relevant: Sequence[float], non_relevant: Sequence[float]) -> tuple[float | None, str | None]:
    """Mann-Whitney AUC (module docstring): ``(value, None)``, or ``(None, reason)`` when a class has no score."""
    if not relevant or not non_relevant:
        empty = [name for name, s in ((RELEVANT, relevant), (NON_RELEVANT, non_relevant)) if not s]
        return None, f"no parsed score for class {' and '.join(empty)}: AUC needs at least one pair of each class"
    wins = sum((p > n) + 0.5 * (p == n) for p in relevant for n in non_relevant)
    return wins / (len(relevant) * len(non_relevant)), None


def _negatives(corpus_ids: list[str], judged: set[str], k: int, rng: random.Random) -> list[str]:
    """``k`` distinct random corpus ids outside ``judged`` (fewer only when the corpus has fewer)."""
    available = len(corpus_ids) - len(judged.intersection(corpus_ids))
    if available <= 4 * k:
        pool = [d for d in corpus_ids if d not in judged]
        return rng.sample(pool, min(k, len(pool)))
    out: list[str] = []
    while len(out) < k:  # rejection sampling: cheap on large corpora, at least 3/4 of the draws are kept
        d = corpus_ids[rng.randrange(len(corpus_ids))]
        if d not in judged and d not in out:
            out.append(d)
    return out


def eligible_queries(task: RetrievalTask, index: dict[str, int] | None = None) -> list[str]:
    """Queries (benchmark order) with at least one judged-relevant (qrels score > 0) document in the corpus."""
    index = index if index is not None else {d: i for i, d in enumerate(task.corpus.ids)}
    return [q for q in task.queries.ids if any(r > 0 and d in index for d, r in task.qrels.get(q, {}).items())]


def sample_pairs(task: RetrievalTask, n_queries: int, positives: int, negatives: int, seed: int,
                 domain: str = "") -> list[dict[str, Any]]:
    """The audit's (query, document) pairs, a pure function of the task and the arguments (module docstring).

    Queries are drawn with ``Random(seed)``; each query's documents with ``Random(f"{seed}:{query_id}")``, so a
    query's pairs do not depend on which other queries were drawn. Queries keep the benchmark's order."""
    index = {d: i for i, d in enumerate(task.corpus.ids)}
    qtext = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    eligible = eligible_queries(task, index)
    if not eligible:
        raise DataError(f"{task.name}: no query has a judged-relevant document in the corpus; nothing to audit")
    picked = set(random.Random(seed).sample(eligible, min(n_queries, len(eligible))))
    pairs: list[dict[str, Any]] = []
    for qid in (q for q in eligible if q in picked):
        rng = random.Random(f"{seed}:{qid}")
        judged = task.qrels[qid]
        rel = sorted(d for d, r in judged.items() if r > 0 and d in index)
        chosen = [(d, RELEVANT, judged[d]) for d in rng.sample(rel, min(positives, len(rel)))]
        chosen += [(d, NON_RELEVANT, None) for d in _negatives(task.corpus.ids, set(judged), negatives, rng)]
        for doc_id, label, qrel in chosen:
            pairs.append({"pair_id": content_hash("pair", qid, doc_id), "query_id": qid, "doc_id": doc_id,
                          "label": label, "qrel": qrel, "domain": domain, "query": qtext[qid],
                          "doc": task.corpus.texts[index[doc_id]]})
    return pairs


def score_rows(pairs: list[dict], generated: list[dict], cfg: AuditJobConfig) -> list[dict[str, Any]]:
    """Pairs joined with their generated rows and parsed scores; a failure keeps its reason, never a fake score."""
    from reasonembed.remixer.parsing import parse_score

    a = cfg.annotate
    by_id = {r["pair_id"]: r for r in generated}
    out = []
    for p in pairs:
        g = by_id.get(p["pair_id"])
        row = {**p, "score": None, "error": "", "error_detail": "", "response": "", "truncated": False,
               "num_generated_tokens": 0}
        if g is None:
            row.update(error=MISSING_OUTPUT, error_detail="the engine returned no row for this pair")
        elif g.get("error"):
            row.update(error=g["error"], error_detail=g.get("error_detail") or "")
        else:
            text = g.get("generated_text") or ""
            score, reason = parse_score(text, a.score_pattern, a.min_score, a.max_score)
            row.update(score=score, error=reason or "", response=text, truncated=bool(g.get("truncated")),
                       num_generated_tokens=int(g.get("num_generated_tokens") or 0))
            if reason and row["truncated"]:
                row["error_detail"] = "generation hit max_tokens"
        out.append(row)
    return out


def _class_stats(rows: list[dict], lo: int, hi: int) -> dict[str, Any]:
    scores = [r["score"] for r in rows if not r["error"]]
    hist = Counter(scores)
    return {"pairs": len(rows), "parsed": len(scores), "errors": len(rows) - len(scores),
            "parse_failure_rate": (len(rows) - len(scores)) / len(rows) if rows else None,
            "mean_score": math.fsum(scores) / len(scores) if scores else None,
            "histogram": {str(k): hist[k] for k in range(lo, hi + 1)}}


def summarize(rows: list[dict], cfg: AuditJobConfig) -> dict[str, Any]:
    """Per-class stats, AUC, parse failures and the accuracy of 'score >= relevant_min_score means relevant'."""
    a, t = cfg.annotate, cfg.relevant_min_score
    classes = {c: _class_stats([r for r in rows if r["label"] == c], a.min_score, a.max_score) for c in CLASSES}
    parsed = [r for r in rows if not r["error"]]
    value, reason = auc([r["score"] for r in parsed if r["label"] == RELEVANT],
                        [r["score"] for r in parsed if r["label"] == NON_RELEVANT])
    correct = sum((r["score"] >= t) == (r["label"] == RELEVANT) for r in parsed)
    errors = [r for r in rows if r["error"]]
    return {
        "pairs": len(rows), "parsed": len(parsed), "errors": len(errors),
        "parse_failure_rate": len(errors) / len(rows) if rows else None,
        "errors_by_reason": dict(sorted(Counter(r["error"] for r in errors).items())),
        "classes": classes,
        "auc": value, "auc_reason": reason,
        "auc_near_chance": None if value is None else abs(value - 0.5) < NEAR_CHANCE,
        "threshold_rule": {"relevant_min_score": t, "pairs": len(parsed), "correct": correct,
                           "accuracy": correct / len(parsed) if parsed else None},
    }


def _table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([*PAIR_SCHEMA, *(pa.field(n, t) for n, t in RESULT_FIELDS)])
    return pa.Table.from_pylist(rows, schema=schema)


def _errors_table(rows: list[dict]) -> pa.Table:
    bad = [{"pair_id": r["pair_id"], "query_id": r["query_id"], "doc_id": r["doc_id"], "label": r["label"],
            "reason": r["error"], "detail": r["error_detail"], "raw_text": r["response"]} for r in rows if r["error"]]
    return error_table(bad, ERROR_SCHEMA)


def scores_png(classes: dict[str, dict], title: str) -> bytes:
    """Side-by-side bar charts of the two classes' score histograms (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, color) in zip(axes, ((RELEVANT, "tab:green"), (NON_RELEVANT, "tab:red")), strict=True):
        c = classes[name]
        bars = ax.bar(list(c["histogram"]), list(c["histogram"].values()), color=color)
        ax.bar_label(bars, fontsize=8)
        mean = "–" if c["mean_score"] is None else f"{c['mean_score']:.2f}"
        ax.set_title(f"{name} ({c['parsed']}/{c['pairs']} parsed, mean {mean})", fontsize=9)
        ax.set_xlabel("annotator score")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("pairs")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _verdict(s: dict) -> str:
    if s["auc"] is None:
        return f"AUC could not be computed: {s['auc_reason']}."
    if s["auc_near_chance"]:
        return (f"AUC {s['auc']:.3f} is near chance (|AUC - 0.5| < {NEAR_CHANCE}): the annotator does not separate "
                "relevant from non-relevant documents.")
    way = ("scores relevant documents higher" if s["auc"] > 0.5
           else "scores non-relevant documents higher (reversed)")
    return f"AUC {s['auc']:.3f} is not near chance (|AUC - 0.5| >= {NEAR_CHANCE}): the annotator {way}."


def render_markdown(report: dict) -> str:
    """report.md: what was audited on how many pairs, the per-class table, AUC verdict, threshold rule, settings."""
    from reasonembed.evaluation.report import _fmt

    s, m, d = report, report["model"], report["data"]
    lo, hi = report["score_range"]
    head = ["class", "pairs", "parsed", "parse failures", "mean score", *map(str, range(lo, hi + 1))]
    lines = [f"# Annotator audit: `{m['reference']}` on {s['pairs']} pairs of `{d['task']}` ({d['split']} qrels)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in s["classes"].items():
        lines.append("| " + " | ".join([name, str(c["pairs"]), str(c["parsed"]), _fmt(c["parse_failure_rate"], 100, 1)
                                        + "%", _fmt(c["mean_score"], 1, 2), *map(str, c["histogram"].values())]) + " |")
    r = s["threshold_rule"]
    lines += ["", _verdict(s), "",
              f"- AUC (Mann-Whitney, ties 1/2, parsed pairs): {_fmt(s['auc'], 1, 3)}",
              f"- rule 'score >= {r['relevant_min_score']} means relevant': accuracy {_fmt(r['accuracy'], 100, 1)}% "
              f"({r['correct']}/{r['pairs']} parsed pairs)",
              f"- parse failures: {s['errors']}/{s['pairs']} ({_fmt(s['parse_failure_rate'], 100, 1)}%) "
              f"{s['errors_by_reason'] or ''}",
              f"- model: `{m['reference']}` (resolved `{m['resolved']}`), sampling {m['sampling']}",
              f"- data: `{d['folder']}`, {d['queries_sampled']} of {d['queries_eligible']} eligible queries, "
              f"seed {report['sampling']['seed']}",
              f"- wall time: {report['wall_s']} s", ""]
    return "\n".join(lines)


def _describe(cfg: AuditJobConfig, task: RetrievalTask, folder: Path, pairs: list[dict], source: str) -> dict:
    n_q = len({p["query_id"] for p in pairs})
    eligible = len(eligible_queries(task))
    return {
        "model": {"reference": cfg.annotator.model, "resolved": source,
                  "sampling": cfg.annotator.sampling.model_dump(mode="json"),
                  "structured_output": cfg.annotator.structured_output.model_dump(mode="json", exclude_none=True)
                  if cfg.annotator.structured_output else None,
                  "chat_template_kwargs": cfg.annotator.chat_template_kwargs},
        "data": {"task": task.name, "folder": str(folder.resolve()), "split": cfg.split,
                 "revision": task.metadata.get("revision"), "docs": len(task.corpus), "queries_eligible": eligible,
                 "queries_sampled": n_q, "domain": cfg.domain},
        "sampling": {"n_queries": cfg.n_queries, "positives_per_query": cfg.positives_per_query,
                     "negatives_per_query": cfg.negatives_per_query, "seed": cfg.seed},
    }


def _write(cfg: AuditJobConfig, report: dict, rows: list[dict]) -> None:
    from reasonembed.evaluation.report import _fmt
    from reasonembed.storage import Location

    loc = Location(report["out"], cfg.storage)
    loc.write_table("pairs.parquet", _table(rows))
    loc.write_table("errors.parquet", _errors_table(rows))
    title = f"{report['model']['reference']} on {report['data']['task']}: AUC {_fmt(report['auc'], 1, 3)}"
    loc.write_bytes("scores.png", scores_png(report["classes"], title))
    loc.write_bytes("report.md", render_markdown(report).encode())
    loc.write_json("report.json", report)


def run(cfg: AuditJobConfig) -> dict[str, Any]:
    """Sample pairs, score them with the annotator in one Ray Data vLLM run, write the audit; returns report.json."""
    from reasonembed.data.beir import load_beir_folder
    from reasonembed.llm.engine_args import resolve_model_source
    from reasonembed.llm.generation import generate_tables
    from reasonembed.remixer.annotate import AnnotationMessages
    from reasonembed.remixer.prompts import profile_for
    from reasonembed.remixer.sources import expand_path
    from reasonembed.runtime import apply_env_defaults, connect_ray
    from reasonembed.storage import join

    apply_env_defaults()
    t0 = time.time()
    folder = Path(expand_path(cfg.data)).expanduser()
    task = load_beir_folder(folder, split=cfg.split)
    pairs = sample_pairs(task, cfg.n_queries, cfg.positives_per_query, cfg.negatives_per_query, cfg.seed, cfg.domain)
    source = resolve_model_source(cfg.annotator.model)
    log.info("audit-annotator: %d pairs from %d queries of %s", len(pairs), len({p["query_id"] for p in pairs}), folder)
    connect_ray(cfg.ray)
    messages = AnnotationMessages({cfg.domain: profile_for(cfg.domain, cfg.domain_profile)}, cfg.annotate.prompt)
    ok, bad = generate_tables(pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA), cfg.annotator, messages,
                              id_column="pair_id", keep_columns=["query_id", "doc_id", "label"])
    rows = score_rows(pairs, ok.to_pylist() + bad.to_pylist(), cfg)
    report = {"audited": "LLM relevance annotator vs benchmark qrels", **summarize(rows, cfg),
              **_describe(cfg, task, folder, pairs, source),
              "score_range": [cfg.annotate.min_score, cfg.annotate.max_score],
              "out": join(cfg.out, cfg.run_id, "audit"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "wall_s": round(time.time() - t0, 2), "config": cfg.model_dump(mode="json")}
    _write(cfg, report, rows)
    log.info("audit-annotator: AUC %s, %d/%d parsed -> %s", report["auc"], report["parsed"], report["pairs"],
             report["out"])
    return report
