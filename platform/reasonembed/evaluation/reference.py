"""The paper's published reference numbers, as data: nDCG@10 x 100 on the original queries.

These are the numbers ReasonEmbed (arXiv 2510.08252) publishes for BRIGHT (per task and the average over its 12
tasks) and R2MED (the average over its 8 tasks only), copied from the table in docs/algorithm.md, "Reference
numbers". They were **not measured here**; ``reasonembed compare`` prints them beside measured runs so that a run can
be read against the paper, and only for the metric they are in (``REFERENCE_METRIC``) and for runs of the corpus
protocol (the paper searches the whole corpus).

Keys are report task keys (``bright/<task>``, see reasonembed.data.bright.BRIGHT_TASKS) and the benchmark averages
``bright/avg`` and ``r2med/avg``.
"""

from __future__ import annotations

REFERENCE_METRIC = "ndcg_at_10"
REFERENCE_SOURCE = "ReasonEmbed paper (arXiv 2510.08252), nDCG@10 x 100, as published"

# Column order of the paper's BRIGHT table.
_BRIGHT = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow", "sustainable_living",
           "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems")


def _row(bright_avg: float, per_task: tuple[float, ...], r2med_avg: float | None) -> dict[str, float]:
    row = {f"bright/{t}": v for t, v in zip(_BRIGHT, per_task, strict=True)}
    row["bright/avg"] = bright_avg
    if r2med_avg is not None:
        row["r2med/avg"] = r2med_avg
    return row


# model -> {task key or benchmark average: nDCG@10 x 100}
REFERENCE: dict[str, dict[str, float]] = {
    "BM25 (BRIGHT's)": _row(14.5, (18.9, 27.2, 14.9, 12.5, 13.6, 18.4, 15.0, 24.4, 7.9, 6.2, 10.4, 4.9), 15.13),
    "all-mpnet-base-v2": _row(14.9, (15.1, 20.4, 16.6, 22.7, 8.2, 11.0, 15.3, 26.4, 7.0, 5.3, 20.0, 10.8), None),
    "ReasonIR-8B": _row(24.4, (26.2, 31.4, 23.3, 30.0, 18.0, 23.9, 20.5, 35.0, 10.5, 14.7, 31.9, 27.2), 27.94),
    "ReasonEmbed-Qwen3-8B, basic InfoNCE": _row(
        37.1, (54.4, 55.4, 33.8, 45.2, 32.0, 34.3, 37.3, 32.3, 18.7, 13.3, 41.2, 47.6), 42.36),
    "ReasonEmbed-Qwen3-8B, RI-InfoNCE": _row(
        38.1, (55.5, 56.6, 36.2, 47.4, 35.3, 36.6, 39.1, 33.6, 16.4, 12.5, 41.4, 47.2), 43.18),
    "ReasonEmbed-Qwen3-4B, RI-InfoNCE": _row(
        37.1, (55.4, 54.5, 34.9, 46.9, 34.0, 36.1, 37.4, 34.5, 13.6, 11.3, 41.4, 45.1), 41.16),
}


def covered(column: str) -> bool:
    """Whether the reference tables have a number for a task key or benchmark-average column."""
    return any(column in row for row in REFERENCE.values())
