"""Evaluation reports: ``report.json`` (everything), ``report.md`` (a paper-style table plus details), per task a
``run.trec``, ``per_query.jsonl`` and a PNG bar chart of the headline metrics.

Layout under ``out_dir``::

    report.json  report.md
    <benchmark>/<task>/run.trec  per_query.jsonl  metrics.png

The table follows the paper (arXiv 2510.08252, table 1): one row per model or retriever, one column per task, then the
average of each benchmark (when a report spans several) and the overall average, all nDCG@10 x 100. Averages are
plain means over tasks of the per-task means, as BRIGHT and R2MED report them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reasonembed.data.types import RetrievalTask
from reasonembed.evaluation.metrics import HEADLINE_METRICS, MAIN_METRIC, EvalResult
from reasonembed.evaluation.runs import write_trec_run


@dataclass
class TaskReport:
    """One task's outcome: mean metrics, counts, where the data came from and anything the pipeline adds."""

    task: str
    benchmark: str
    metrics: dict[str, float]
    n_queries: int
    n_docs: int
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.task}"


def task_report(task: RetrievalTask, result: EvalResult, **extra: Any) -> TaskReport:
    """Combine a task and its evaluation into a ``TaskReport`` (``extra``: timings, exclusion stats, ...)."""
    meta = task.metadata
    data = {k: meta[k] for k in ("source", "revision", "files", "validation", "hub_repo", "query_split") if k in meta}
    data["instruction"] = task.instruction
    if result.missing_queries:
        extra.setdefault("queries_without_results", len(result.missing_queries))
    return TaskReport(
        task=task.name, benchmark=task.benchmark, metrics=dict(result.mean), n_queries=result.n_queries,
        n_docs=len(task.corpus), data=data, extra=extra,
    )


# What each query ranked under each evaluation protocol (the first line of report.md says it).
PROTOCOLS: dict[str, str] = {
    "corpus": "each query searches the whole corpus",
    "pool": "each query ranks only the documents its qrels list",
}


@dataclass
class Report:
    """A model's (or retriever's) results over tasks, with the config that produced them.

    ``name`` labels the table row; ``model`` describes the model (name, path, revision, pooling, ...); ``protocol``
    says what each query ranked (``PROTOCOLS``): numbers of different protocols are not comparable."""

    name: str
    tasks: list[TaskReport]
    model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    main_metric: str = MAIN_METRIC
    protocol: str = "corpus"

    def benchmarks(self) -> list[str]:
        return list(dict.fromkeys(t.benchmark for t in self.tasks))

    def averages(self) -> dict[str, dict[str, float]]:
        """``{"all": {...}, "<benchmark>": {...}}``: metric means over tasks (metrics present in every task)."""
        groups = {"all": self.tasks, **{b: [t for t in self.tasks if t.benchmark == b] for b in self.benchmarks()}}
        out: dict[str, dict[str, float]] = {}
        for g, ts in groups.items():
            if not ts:
                continue
            common = set.intersection(*(set(t.metrics) for t in ts))
            out[g] = {m: math.fsum(t.metrics[m] for t in ts) / len(ts) for m in sorted(common)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "main_metric": self.main_metric,
            "protocol": self.protocol,
            "model": self.model,
            "config": self.config,
            "tasks": {t.key: asdict(t) for t in self.tasks},
            "averages": self.averages(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        tasks = [TaskReport(**t) for t in d["tasks"].values()]
        return cls(
            name=d["name"], tasks=tasks, model=dict(d.get("model", {})), config=dict(d.get("config", {})),
            created=d.get("created", ""), main_metric=d.get("main_metric", MAIN_METRIC),
            # reports written before protocols existed searched the whole corpus
            protocol=d.get("protocol", "corpus"),
        )


def load_report(path: str | Path) -> Report:
    """Read a ``report.json`` (or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    return Report.from_dict(json.loads(p.read_text()))


def _fmt(v: float | None, scale: float, digits: int) -> str:
    return "–" if v is None else f"{v * scale:.{digits}f}"


def markdown_table(reports: list[Report], metric: str = MAIN_METRIC, scale: float = 100.0, digits: int = 2) -> str:
    """Paper-style table: rows = reports, columns = tasks (union, in first-seen order), per-benchmark averages
    when there are several benchmarks, then the overall average. Missing cells read ``–``."""
    cols: list[tuple[str, str]] = []  # (benchmark, task)
    for r in reports:
        for t in r.tasks:
            if (t.benchmark, t.task) not in cols:
                cols.append((t.benchmark, t.task))
    benchmarks = list(dict.fromkeys(b for b, _ in cols))
    multi = len(benchmarks) > 1
    header = ["model"] + [f"{b}/{t}" if multi else t for b, t in cols]
    if multi:
        header += [f"{b} avg" for b in benchmarks]
    header += ["avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in reports:
        by_key = {(t.benchmark, t.task): t.metrics.get(metric) for t in r.tasks}
        avgs = r.averages()
        row = [r.name] + [_fmt(by_key.get(c), scale, digits) for c in cols]
        if multi:
            row += [_fmt(avgs.get(b, {}).get(metric), scale, digits) for b in benchmarks]
        row += [_fmt(avgs.get("all", {}).get(metric), scale, digits)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _details_md(report: Report, metrics: tuple[str, ...]) -> str:
    head = ["task", "queries", "docs"] + list(metrics)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in report.tasks:
        vals = [_fmt(t.metrics.get(m), 100.0, 2) for m in metrics]
        lines.append("| " + " | ".join([t.key, str(t.n_queries), str(t.n_docs), *vals]) + " |")
    notes = []
    for t in report.tasks:
        rev = t.data.get("revision", "unknown")
        warn = {k: v for k, v in (t.data.get("validation") or {}).items() if v}
        extra = {k: v for k, v in t.extra.items() if isinstance(v, (int, float, str))}
        note = f"- `{t.key}`: data revision `{rev}`"
        if warn:
            note += f"; data warnings {warn}"
        if extra:
            note += f"; {extra}"
        notes.append(note)
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def render_markdown(report: Report, metrics: tuple[str, ...] = HEADLINE_METRICS) -> str:
    """The whole report.md: headline table, per-task metrics (x100), data revisions and warnings, model, config."""
    protocol = PROTOCOLS.get(report.protocol, report.protocol)
    parts = [
        f"# Evaluation: {report.name} (protocol {report.protocol}: {protocol})",
        "",
        f"{report.main_metric} x 100 ({report.created})",
        "",
        markdown_table([report], report.main_metric),
        "",
        "## Metrics per task (x 100)",
        "",
        _details_md(report, metrics),
        "",
        "## Model",
        "",
        "```json",
        json.dumps(report.model, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(report.config, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(parts)


def plot_task(entries: list[tuple[str, TaskReport]], path: str | Path, metrics: tuple[str, ...] = HEADLINE_METRICS) -> Path:
    """Grouped bar chart (PNG) of ``metrics`` x 100 for one task, one bar group per metric, one bar per entry
    (label, TaskReport). Drawn with matplotlib's Agg canvas directly, so no global backend or pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not entries:
        raise ValueError("plot_task: nothing to plot")
    shown = [m for m in metrics if all(m in t.metrics for _, t in entries)]
    fig = Figure(figsize=(max(6.0, 1.1 * len(shown) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(entries)
    for j, (label, t) in enumerate(entries):
        xs = [i + (j - (len(entries) - 1) / 2) * width for i in range(len(shown))]
        vals = [t.metrics[m] * 100 for m in shown]
        bars = ax.bar(xs, vals, width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([m.replace("_at_", "@") for m in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("x 100")
    ax.set_ylim(0, 105)
    first = entries[0][1]
    ax.set_title(f"{first.key} ({first.n_queries} queries, {first.n_docs} docs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p


def write_per_query(result: EvalResult, path: str | Path, metrics: tuple[str, ...] = HEADLINE_METRICS) -> Path:
    """Per-query metrics as JSON lines ``{"query_id", <metric>: value, ...}`` (for significance tests)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for qid, vals in result.per_query.items():
            f.write(json.dumps({"query_id": qid, **{m: vals[m] for m in metrics if m in vals}}) + "\n")
    return p


def write_report(
    report: Report,
    out_dir: str | Path,
    *,
    runs: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    results: Mapping[str, EvalResult] | None = None,
    plots: bool = True,
    run_tag: str | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and, per task, run.trec (``runs[task_key]``), per_query.jsonl
    (``results[task_key]``) and metrics.png. ``task_key`` is ``"<benchmark>/<task>"``. Returns written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tag = run_tag or "".join(c if c.isalnum() or c in "-_." else "_" for c in report.name) or "reasonembed"
    for t in report.tasks:
        folder = out / t.benchmark / t.task
        if runs is not None and t.key in runs:
            written[f"{t.key}/run.trec"] = write_trec_run(runs[t.key], folder / "run.trec", tag=tag)
        if results is not None and t.key in results:
            written[f"{t.key}/per_query.jsonl"] = write_per_query(results[t.key], folder / "per_query.jsonl")
        if plots:
            written[f"{t.key}/metrics.png"] = plot_task([(report.name, t)], folder / "metrics.png")
    js = out / "report.json"
    js.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=False, default=str) + "\n")
    written["report.json"] = js
    md = out / "report.md"
    md.write_text(render_markdown(report))
    written["report.md"] = md
    return written
