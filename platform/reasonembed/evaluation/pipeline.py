"""`reasonembed evaluate`: load tasks, retrieve (dense / BM25 / hybrid), remove excluded ids, score, report.

For every task: retrieve the top ``k`` per query (2000 for BRIGHT, as in the paper) from the whole corpus
(``protocol: corpus``) or rank each query's own qrels pool (``protocol: pool``, reasonembed.evaluation.pool), drop
the query's ``excluded_ids`` (BRIGHT), compute nDCG@{1,5,10,100}, recall@{10,100}, MRR@10, MAP and accuracy@1, then
write ``report.json``, ``report.md``, ``<benchmark>/<task>/run.trec`` and a PNG per task under ``out``.

Max length per task (dense and hybrid): one model serves every task, but a benchmark may fix its own input length
(R2MED: 512); ``task_max_length`` gives the precedence (run-level ``max_length`` > the task's length >
``embedder.max_length`` > the model's) and each task's report records ``max_length`` and ``max_length_source``.
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
from reasonembed.data.types import RetrievalTask
from reasonembed.evaluation.bm25 import bm25_run
from reasonembed.evaluation.metrics import evaluate
from reasonembed.evaluation.pool import pool_depth, pool_run
from reasonembed.evaluation.report import Report, task_report, write_report
from reasonembed.evaluation.retrieve import dense_run, fuse
from reasonembed.evaluation.runs import ExclusionStats, remove_excluded
from reasonembed.models.embedder import Embedder
from reasonembed.storage import Location, is_s3

log = logging.getLogger(__name__)


def default_top_k(benchmark: str) -> int:
    return 2000 if benchmark == "bright" else 1000


def task_max_length(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder) -> tuple[int, str]:
    """(max tokens per input for ``task``, where that number came from), first match wins:

    1. ``cfg.max_length``, an explicit choice for every task of the run (``"config"``);
    2. the task's ``metadata["max_length"]``, part of its benchmark's protocol (R2MED: 512) (``"task"``);
    3. the embedder's length: ``embedder.max_length``, else the model's own (``"embedder"``).

    Why the task's length beats ``embedder.max_length``: a long-context preset (8192, for BRIGHT) would otherwise
    encode R2MED at 8192 and report numbers that are not R2MED's; the run-level override stays available for a
    deliberate departure from the protocol.
    """
    if cfg.max_length is not None:
        return cfg.max_length, "config"
    if task.metadata.get("max_length"):
        return int(task.metadata["max_length"]), "task"
    return embedder.max_length, "embedder"


def corpus_run(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder | None) -> tuple[dict, dict]:
    """The corpus-protocol run of ``task``: each query searches the whole corpus for its top ``k``."""
    k = cfg.top_k or default_top_k(task.benchmark)
    info: dict = {"protocol": "corpus", "top_k": k}
    if cfg.retriever == "bm25":
        return bm25_run(task, cfg.bm25.model_copy(update={"top_k": k}), k=k), info
    run_, dense_info = dense_run(cfg, task, embedder, k)
    info.update(dense_info)
    if cfg.retriever == "hybrid":
        run_ = fuse(run_, bm25_run(task, cfg.bm25.model_copy(update={"top_k": k}), k=k), cfg.hybrid_alpha, k)
    return run_, info


def evaluate_task(cfg: EvaluateJobConfig, task: RetrievalTask, embedder: Embedder | None):
    """Retrieve (``cfg.protocol``: the whole corpus, or each query's pool), remove excluded ids and score one task;
    returns (TaskReport, run, EvalResult)."""
    t0 = time.time()
    info: dict = {"retriever": cfg.retriever}
    if embedder is not None:
        length, source = task_max_length(cfg, task, embedder)
        info.update(max_length=length, max_length_source=source)
        embedder = embedder.with_max_length(length)
    if cfg.protocol == "pool":
        run_, retrieved = pool_run(cfg, task, embedder)
        keep = pool_depth(cfg)  # a pool is cut (after exclusion) only to a top_k the user set
    else:
        run_, retrieved = corpus_run(cfg, task, embedder)
        keep = None  # the top k were retrieved before exclusion, as BRIGHT's evaluator does
    info.update(retrieved)
    stats = ExclusionStats()
    run_ = remove_excluded(run_, task.excluded_ids, k=keep, stats=stats)
    info.update(excluded_removed=stats.n_removed, queries_with_exclusions_hit=stats.n_queries_affected)
    res = evaluate(task.qrels, run_, cfg.k_values)
    info["wall_s"] = round(time.time() - t0, 2)
    tr = task_report(task, res, **info)
    log.info("%s: nDCG@10 %.4f (%d queries, %.1f s)", tr.key, res.mean.get("ndcg_at_10", float("nan")),
             res.n_queries, info["wall_s"])
    return tr, run_, res


def run(cfg: EvaluateJobConfig) -> dict:
    """Evaluate every task of ``cfg`` and write the reports; returns {task key: nDCG@10, ..., 'report': path}."""
    t_start = time.time()
    specs = expand_specs(cfg.tasks)
    if cfg.prebuilt_index and len(specs) != 1:
        raise ConfigError(f"prebuilt_index serves one task, but tasks expand to {len(specs)}: {specs}")
    # Fail before any work on bad input; s3:// task folders are read with the job's storage settings.
    tasks = [load_task(s, cfg.data_dir, source=cfg.source, storage=cfg.storage) for s in specs]
    if cfg.max_queries:
        tasks = [t.limit_queries(cfg.max_queries) for t in tasks]
    embedder = None
    if cfg.retriever in ("dense", "hybrid"):
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
            tr, run_, res = evaluate_task(cfg, task, embedder)
            reports.append(tr)
            runs[tr.key], results[tr.key] = run_, res
            bar.update(len(task.queries))
    model = embedder.describe() if embedder else {"retriever": "bm25", **cfg.bm25.model_dump()}
    name = cfg.name or (model.get("model_name") if embedder else "BM25")
    if cfg.retriever == "hybrid":
        name = f"{name}+BM25"
    report = Report(name=name, tasks=reports, model=model, config=cfg.model_dump(mode="json"), protocol=cfg.protocol)
    summary = {t.key: {m: round(t.metrics[m], 5) for m in ("ndcg_at_10", "recall_at_100") if m in t.metrics}
               for t in reports}
    summary["report"] = _write(cfg, report, runs, results)
    summary["wall_s"] = round(time.time() - t_start, 1)
    return summary


def _write(cfg: EvaluateJobConfig, report: Report, runs: dict, results: dict) -> str:
    """Write the report files under ``cfg.out`` (local, or uploaded to s3://); returns report.json's location."""
    if is_s3(cfg.out):
        with tempfile.TemporaryDirectory() as tmp:
            written = write_report(report, tmp, runs=runs, results=results, plots=cfg.plots)
            loc = Location(cfg.out, cfg.storage)
            for path in written.values():
                loc.upload_file(path, str(Path(path).relative_to(tmp)))
        return f"{cfg.out.rstrip('/')}/report.json"
    written = write_report(report, cfg.out, runs=runs, results=results, plots=cfg.plots)
    return str(written["report.json"])
