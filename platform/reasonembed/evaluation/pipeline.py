"""`reasonembed evaluate`: load tasks, retrieve (dense / BM25 / hybrid), remove excluded ids, score, report.

For every task: retrieve the top ``k`` per query (2000 for BRIGHT, as in the paper), drop the query's
``excluded_ids`` (BRIGHT), compute nDCG@{1,5,10,100}, recall@{10,100}, MRR@10 and MAP, then write ``report.json``,
``report.md``, ``<benchmark>/<task>/run.trec`` and a PNG per task under ``out``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from reasonembed import progress
from reasonembed.config.base import ConfigError
from reasonembed.config.evaluate import EvaluateJobConfig
from reasonembed.data.catalog import expand_specs, load_task
from reasonembed.evaluation.bm25 import bm25_run
from reasonembed.evaluation.metrics import evaluate
from reasonembed.evaluation.report import Report, task_report, write_report
from reasonembed.evaluation.retrieve import dense_run, fuse
from reasonembed.evaluation.runs import ExclusionStats, remove_excluded
from reasonembed.storage import Location, is_s3

log = logging.getLogger(__name__)


def default_top_k(benchmark: str) -> int:
    return 2000 if benchmark == "bright" else 1000


def run(cfg: EvaluateJobConfig) -> dict:
    """Evaluate every task of ``cfg`` and write the reports; returns {task key: nDCG@10, ..., 'report': path}."""
    t_start = time.time()
    specs = expand_specs(cfg.tasks)
    if cfg.prebuilt_index and len(specs) != 1:
        raise ConfigError(f"prebuilt_index serves one task, but tasks expand to {len(specs)}: {specs}")
    tasks = [load_task(s, cfg.data_dir, source=cfg.source) for s in specs]  # fail before any work on bad input
    if cfg.max_queries:
        tasks = [t.limit_queries(cfg.max_queries) for t in tasks]
    embedder = None
    if cfg.retriever in ("dense", "hybrid"):
        from reasonembed.models.embedder import Embedder

        embedder = Embedder(cfg.embedder)
        if cfg.corpus_encoding == "ray":
            from reasonembed.runtime import connect_ray

            connect_ray(cfg.ray)
    reports, runs, results = [], {}, {}
    # One line for the whole evaluation, counted in queries (a task's queries count once it is scored); a dense
    # task's corpus encoding shows its own line (reasonembed.index.encode).
    with progress.step("evaluate", total=sum(len(t.queries) for t in tasks), unit="queries") as bar:
        for i, task in enumerate(tasks):
            bar.set_postfix(f"task {i + 1}/{len(tasks)} {task.benchmark}/{task.name}")
            t0 = time.time()
            k = cfg.top_k or default_top_k(task.benchmark)
            info: dict = {"top_k": k, "retriever": cfg.retriever}
            if cfg.retriever == "bm25":
                run_ = bm25_run(task, cfg.bm25.model_copy(update={"top_k": k}), k=k)
            else:
                run_, dense_info = dense_run(cfg, task, embedder, k)
                info.update(dense_info)
                if cfg.retriever == "hybrid":
                    run_ = fuse(run_, bm25_run(task, cfg.bm25.model_copy(update={"top_k": k}), k=k), cfg.hybrid_alpha, k)
            stats = ExclusionStats()
            run_ = remove_excluded(run_, task.excluded_ids, stats=stats)
            info.update(excluded_removed=stats.n_removed, queries_with_exclusions_hit=stats.n_queries_affected)
            res = evaluate(task.qrels, run_, cfg.k_values)
            info["wall_s"] = round(time.time() - t0, 2)
            tr = task_report(task, res, **info)
            reports.append(tr)
            runs[tr.key], results[tr.key] = run_, res
            log.info("%s: nDCG@10 %.4f (%d queries, %.1f s)", tr.key, res.mean.get("ndcg_at_10", float("nan")),
                     res.n_queries, info["wall_s"])
            bar.update(len(task.queries))
    model = embedder.describe() if embedder else {"retriever": "bm25", **cfg.bm25.model_dump()}
    name = cfg.name or (model.get("model_name") if embedder else "BM25")
    if cfg.retriever == "hybrid":
        name = f"{name}+BM25"
    report = Report(name=name, tasks=reports, model=model, config=cfg.model_dump(mode="json"))
    out_uri = cfg.out
    if is_s3(out_uri):
        with tempfile.TemporaryDirectory() as tmp:
            written = write_report(report, tmp, runs=runs, results=results, plots=cfg.plots)
            loc = Location(out_uri, cfg.storage)
            for path in written.values():
                loc.upload_file(path, str(Path(path).relative_to(tmp)))
        report_path = f"{out_uri.rstrip('/')}/report.json"
    else:
        written = write_report(report, out_uri, runs=runs, results=results, plots=cfg.plots)
        report_path = str(written["report.json"])
    summary = {t.key: {m: round(t.metrics[m], 5) for m in ("ndcg_at_10", "recall_at_100") if m in t.metrics}
               for t in reports}
    summary["report"] = report_path
    summary["wall_s"] = round(time.time() - t_start, 1)
    return summary
