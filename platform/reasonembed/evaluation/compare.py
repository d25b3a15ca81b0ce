"""`reasonembed compare RUN_DIR...`: several evaluate reports side by side, the paper's numbers, and paired tests.

Inputs: folders written by `reasonembed evaluate --out RUN_DIR` (report.json, and per task
``<benchmark>/<task>/per_query.jsonl``). Outputs under ``--out`` (default ``./compare``):

- ``compare.md``: one table, a row per run (label: the report's name; the folder name is added when two names
  clash) and then, for nDCG@10, a row per model of the paper's reference table (reasonembed.evaluation.reference);
  one column per task in any report (a run without that task: blank), then benchmark averages. A run's average is
  over every task of its benchmark (all 12 BRIGHT tasks, all 8 R2MED tasks, or every task of another benchmark
  that any report has), and blank when the run lacks one, so that it is never an average over other tasks than the
  paper's. Below it, the paired tests of each run against the first one, per task;
- ``compare.csv``: the same numbers in long form, one line per (row, column): model, source (run | paper),
  protocol, column, value x 100, and for runs after the first the paired test (n, mean difference, p-values, note);
- ``compare.png``: grouped bars per column, one bar per run, the paper's numbers as markers.

Paired tests (reasonembed.evaluation.significance): per task, on the per-query scores of the chosen metric of the
queries both runs scored: the paired t-test and the paired bootstrap (fixed seed). A task whose per-query file is
missing, lacks the metric, or shares fewer than 2 queries with the first run gets no p-value and a note saying why.

Exit codes: 0 on success, 2 when a RUN_DIR has no report.json or no report has the metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reasonembed.evaluation.metrics import MAIN_METRIC
from reasonembed.evaluation.reference import REFERENCE, REFERENCE_METRIC, REFERENCE_SOURCE
from reasonembed.evaluation.report import Report, load_report
from reasonembed.evaluation.significance import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    paired_bootstrap,
    paired_t_test,
)

EXIT_USAGE = 2
SCALE = 100.0


class CompareError(ValueError):
    """A comparison that cannot be made (a folder without report.json, a metric no report has)."""


@dataclass
class RunEntry:
    """One evaluate output folder: its table label, folder and report."""

    label: str
    folder: Path
    report: Report


@dataclass
class PairedResult:
    """A run against the first run on one task: paired queries, mean difference, p-values, or why there are none."""

    n: int = 0
    mean_diff: float | None = None
    p_ttest: float | None = None
    p_bootstrap: float | None = None
    note: str = ""


@dataclass
class Row:
    """A table row: a run or a paper reference model, with its values per column (metric, not scaled)."""

    label: str
    source: str
    protocol: str
    values: dict[str, float | None]
    tests: dict[str, PairedResult] = field(default_factory=dict)


@dataclass
class Comparison:
    metric: str
    columns: list[str]
    rows: list[Row]


def load_runs(folders: Sequence[str | Path]) -> list[RunEntry]:
    """The reports of ``folders``, labelled; a folder without report.json is a CompareError naming it."""
    entries = []
    for f in folders:
        folder = Path(f)
        if not (folder / "report.json").is_file():
            raise CompareError(f"{folder} has no report.json; give folders written by "
                               f"`reasonembed evaluate --out <folder>`")
        entries.append(RunEntry(label="", folder=folder, report=load_report(folder)))
    names = [e.report.name for e in entries]
    for i, e in enumerate(entries):
        label = e.report.name if names.count(e.report.name) == 1 else f"{e.report.name} ({e.folder.name})"
        e.label = label if label not in [x.label for x in entries[:i]] else f"{label} #{i + 1}"
    return entries


def _benchmark_tasks(benchmark: str, task_keys: list[str]) -> list[str]:
    """The tasks a benchmark average is over (module docstring)."""
    from reasonembed.data import BRIGHT_TASKS, R2MED_TASKS

    known = {"bright": BRIGHT_TASKS, "r2med": R2MED_TASKS}.get(benchmark)
    if known is not None:
        return [f"{benchmark}/{t}" for t in known]
    return [k for k in task_keys if k.split("/", 1)[0] == benchmark]


def table_columns(entries: list[RunEntry]) -> list[str]:
    """Task keys in first-seen order, then ``<benchmark>/avg`` for BRIGHT, R2MED and any benchmark with several
    tasks."""
    tasks = list(dict.fromkeys(t.key for e in entries for t in e.report.tasks))
    benchmarks = list(dict.fromkeys(k.split("/", 1)[0] for k in tasks))
    avgs = [f"{b}/avg" for b in benchmarks
            if b in ("bright", "r2med") or sum(k.startswith(f"{b}/") for k in tasks) > 1]
    return tasks + avgs


def _run_values(entry: RunEntry, columns: list[str], metric: str) -> dict[str, float | None]:
    by_key = {t.key: t.metrics.get(metric) for t in entry.report.tasks}
    task_keys = [c for c in columns if not c.endswith("/avg")]
    values: dict[str, float | None] = {c: by_key.get(c) for c in task_keys}
    for col in columns:
        if col.endswith("/avg"):
            parts = [by_key.get(k) for k in _benchmark_tasks(col.split("/", 1)[0], task_keys)]
            values[col] = math.fsum(parts) / len(parts) if parts and None not in parts else None
    return values


def per_query_scores(entry: RunEntry, task_key: str, metric: str) -> tuple[dict[str, float] | None, str]:
    """({query id: metric}, "") from the run's per_query.jsonl for ``task_key``, or (None, why not)."""
    path = entry.folder / task_key / "per_query.jsonl"
    if not path.is_file():
        return None, f"no per-query file for {entry.label} ({path})"
    scores = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if metric not in rec:
            return None, f"{path} has no per-query {metric}"
        scores[str(rec["query_id"])] = float(rec[metric])
    return scores, ""


def paired_test(base: RunEntry, other: RunEntry, task_key: str, metric: str) -> PairedResult:
    """``other`` against ``base`` on one task (module docstring)."""
    a, why_a = per_query_scores(base, task_key, metric)
    b, why_b = per_query_scores(other, task_key, metric)
    if a is None or b is None:
        return PairedResult(note=f"no p-value: {why_a or why_b}")
    common = [q for q in a if q in b]
    if len(common) < 2:
        return PairedResult(n=len(common), note=f"no p-value: only {len(common)} queries scored by both runs")
    xa, xb = [a[q] for q in common], [b[q] for q in common]
    note = "" if len(common) == len(a) == len(b) else f"paired on the {len(common)} queries both runs scored"
    return PairedResult(n=len(common), mean_diff=math.fsum(xb) / len(xb) - math.fsum(xa) / len(xa),
                        p_ttest=paired_t_test(xa, xb), p_bootstrap=paired_bootstrap(xa, xb), note=note)


def compare(entries: list[RunEntry], metric: str = MAIN_METRIC) -> Comparison:
    """The comparison table of ``entries`` (module docstring)."""
    if not entries:
        raise CompareError("nothing to compare: give at least one RUN_DIR")
    if not any(metric in t.metrics for e in entries for t in e.report.tasks):
        raise CompareError(f"no report has metric {metric!r}")
    columns = table_columns(entries)
    rows = []
    for i, e in enumerate(entries):
        row = Row(e.label, "run", e.report.protocol, _run_values(e, columns, metric))
        if i > 0:
            tasks = {t.key for t in e.report.tasks} & {t.key for t in entries[0].report.tasks}
            row.tests = {k: paired_test(entries[0], e, k, metric) for k in columns if k in tasks}
        rows.append(row)
    if metric == REFERENCE_METRIC:
        for model, ref in REFERENCE.items():
            values = {c: ref[c] / SCALE for c in columns if c in ref}
            if values:
                rows.append(Row(f"paper: {model}", "paper", "corpus", values))
    return Comparison(metric, columns, rows)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v * SCALE:.{digits}f}"


def _p(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def render_markdown(c: Comparison) -> str:
    """compare.md: the table, then the paired tests against the first run."""
    head = ["model", "protocol", *c.columns]
    lines = [f"# Compare: {c.metric} x {SCALE:g}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c.rows:
        lines.append("| " + " | ".join([r.label, r.protocol, *(_fmt(r.values.get(k)) for k in c.columns)]) + " |")
    if any(r.source == "paper" for r in c.rows):
        lines += ["", f"Rows `paper: ...`: {REFERENCE_SOURCE}; not measured here."]
    tested = [r for r in c.rows if r.tests]
    if tested:
        first = c.rows[0].label
        lines += ["", f"## Paired tests against {first} (per-query {c.metric}; two-sided p: paired t-test, paired "
                  f"bootstrap with {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})", "",
                  "| model | task | queries | mean diff x 100 | p (t-test) | p (bootstrap) | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in tested:
            for k, t in r.tests.items():
                lines.append(f"| {r.label} | {k} | {t.n} | {_fmt(t.mean_diff)} | {_p(t.p_ttest)} | "
                             f"{_p(t.p_bootstrap)} | {t.note} |")
    return "\n".join(lines) + "\n"


def write_csv(c: Comparison, path: Path) -> Path:
    """compare.csv in long form (module docstring)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "source", "protocol", "column", "metric", "value_x100", "n_paired",
                    "mean_diff_x100", "p_ttest", "p_bootstrap", "note"])
        for r in c.rows:
            for k in c.columns:
                t = r.tests.get(k, PairedResult())
                if r.values.get(k) is None and k not in r.tests:
                    continue
                w.writerow([r.label, r.source, r.protocol, k, c.metric, _fmt(r.values.get(k), 4),
                            t.n if k in r.tests else "", _fmt(t.mean_diff, 4), _p(t.p_ttest), _p(t.p_bootstrap),
                            t.note])
    return path


def plot(c: Comparison, path: Path) -> Path:
    """compare.png: grouped bars per column (one per run), the paper's numbers as black markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in c.rows if r.source == "run"]
    refs = [r for r in c.rows if r.source == "paper"]
    fig = Figure(figsize=(max(6.0, 0.9 * len(c.columns) * max(1, len(runs)) ** 0.5 + 3), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(runs))
    for j, r in enumerate(runs):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i, k in enumerate(c.columns) if r.values.get(k) is not None]
        ys = [r.values[k] * SCALE for k in c.columns if r.values.get(k) is not None]
        bars = ax.bar(xs, ys, width=width, label=r.label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    markers = "_x+1234"
    for j, r in enumerate(refs):
        pts = [(i, r.values[k] * SCALE) for i, k in enumerate(c.columns) if r.values.get(k) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[j % len(markers)], color="black",
                   s=60, label=r.label, zorder=3)
    ax.set_xticks(range(len(c.columns)))
    ax.set_xticklabels(c.columns, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{c.metric} x {SCALE:g}")
    ax.set_title(f"{c.metric} per task")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_compare(c: Comparison, out: str | Path) -> dict[str, Path]:
    """Write compare.md, compare.csv and compare.png under ``out``; returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "compare.md"
    md.write_text(render_markdown(c))
    return {"md": md, "csv": write_csv(c, folder / "compare.csv"), "png": plot(c, folder / "compare.png")}


def main(argv: list[str]) -> int:
    """`reasonembed compare RUN_DIR... [--out DIR] [--metric M]`: print the table, write md/CSV/PNG."""
    parser = argparse.ArgumentParser(prog="reasonembed compare", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="folders written by `reasonembed evaluate --out`")
    parser.add_argument("--out", default="compare", help="where compare.md/.csv/.png go (default ./compare)")
    parser.add_argument("--metric", default=MAIN_METRIC, help=f"metric to compare (default {MAIN_METRIC})")
    ns = parser.parse_args(argv)
    try:
        comparison = compare(load_runs(ns.run_dirs), ns.metric)
    except CompareError as exc:
        print(f"reasonembed compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    written = write_compare(comparison, ns.out)
    print(render_markdown(comparison))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
