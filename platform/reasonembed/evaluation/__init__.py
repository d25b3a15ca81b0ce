"""Evaluation building blocks: trec_eval-exact metrics, BM25 baseline, TREC runs, exclusion, reports."""

from reasonembed.evaluation.bm25 import BM25Config, BM25Retriever, bm25_run
from reasonembed.evaluation.metrics import (
    DEFAULT_K_VALUES,
    HEADLINE_METRICS,
    MAIN_METRIC,
    EvalResult,
    evaluate,
    query_metrics,
    rank_docs,
)
from reasonembed.evaluation.report import (
    Report,
    TaskReport,
    load_report,
    markdown_table,
    plot_task,
    task_report,
    write_report,
)
from reasonembed.evaluation.runs import ExclusionStats, read_trec_run, remove_excluded, top_k, write_trec_run

__all__ = [
    "BM25Config",
    "BM25Retriever",
    "DEFAULT_K_VALUES",
    "EvalResult",
    "ExclusionStats",
    "HEADLINE_METRICS",
    "MAIN_METRIC",
    "Report",
    "TaskReport",
    "bm25_run",
    "evaluate",
    "load_report",
    "markdown_table",
    "plot_task",
    "query_metrics",
    "rank_docs",
    "read_trec_run",
    "remove_excluded",
    "task_report",
    "top_k",
    "write_report",
    "write_trec_run",
]
