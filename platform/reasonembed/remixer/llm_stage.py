"""Run one LLM stage (domain filter, query generation, q', annotation) over its pending shards, committing each
shard as soon as all of its rows are back.

Exactly-once protocol:
1. the stage's rows are fully determined by the finished upstream stage (ids are content hashes, each row carries
   the shard of the source it descends from);
2. only shards without a part file are sent; all of them go through *one* ``reasonembed.llm.generate`` pipeline
   (one engine start-up), one Ray block per shard;
3. the driver streams results and groups them by shard. Each row carries a content key of its input
   (:data:`INPUT_KEY`), and repeated ids follow the one rule of ``reasonembed.repeats``: a repeat with the same input
   (a Ray task retry) is dropped, rows sharing an id with *different* inputs all become error rows
   (``repeats.CONFLICTING_ID``). When a shard is complete its error rows are written (an empty table removes a stale
   error file of an interrupted attempt) and then its part file (atomic; the part's presence marks the shard done);
4. vLLM sampling is seeded per row from (seed, row id) (``reasonembed.llm.sampling``), so a shard re-done after a
   kill produces the same text as an uninterrupted run.
A row the engine never answers (missing at the end) is a bug and fails the stage loudly instead of losing it.

Retrying error rows (``retry_errors``): the error rows of finished shards are sent again (same ids, so the same
seeds). A shard's retry outcome is first written as a journal, ``retry/<shard>.<attempt>.parquet`` (the resolved
generated rows, one atomic file), then applied: the part becomes its rows minus the retried ids plus the rows that
now succeed, the error file the error rows minus the retried ids plus those that failed again. Applying is
idempotent, and every journal is re-applied in order before anything else runs, so a kill at any point neither
loses nor duplicates a row. Journals stay until the stage's manifest is written (:func:`clear_retries`), and give
the manifest's ``rows_retried`` / ``rows_recovered`` and the shards whose rows changed.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed import progress
from reasonembed.config.llm import LLMEngineConfig
from reasonembed.llm.engine_pool import EnginePool
from reasonembed.remixer.context import Context
from reasonembed.remixer.stage import StageResult
from reasonembed.repeats import CONFLICTING_ID, content_key, split_repeats
from reasonembed.storage import StageDir

log = logging.getLogger(__name__)

# (shard, generated rows of that shard) -> (part table, error table)
Postprocess = Callable[[str, pa.Table], tuple[pa.Table, pa.Table]]
# Column carried through generation: a digest of the row's whole input (tells a retry from a conflicting id).
INPUT_KEY = "input_key"
RETRY_DIR = "retry"


@dataclass
class LLMTask:
    """What an LLM stage sends and how its outputs become rows.

    ``part_id`` / ``error_id`` name the column of the part and error rows that holds the request id; a task with
    both can have its error rows retried (the domain filter's rows are keyed by (domain, doc_id) and are not).
    """

    engine: LLMEngineConfig
    build_messages: Any  # picklable ``row -> messages`` (see ``reasonembed.llm.generate``)
    postprocess: Postprocess
    id_column: str  # unique request id (also seeds sampling)
    keep_columns: list[str]  # input columns carried to the output rows
    part_id: str | None = None
    error_id: str | None = None


@dataclass
class LLMStageStats:
    """What one run of an LLM stage did (only the shards it processed, not the ones done before)."""

    shards_done_before: int = 0
    shards_run: int = 0
    rows_sent: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    llm_s: float = 0.0  # from submitting the pipeline to the last output (actor and engine start-up included)
    first_output_s: float = 0.0  # from submitting to the first output batch (mostly start-up)
    steady_tokens: int = 0  # tokens of the batches after the first
    model: dict = field(default_factory=dict)  # what ran: see model_record
    repeats_dropped: int = 0  # identical repeats of a row (Ray task retries)
    conflicting_rows: int = 0  # rows whose id came with another input too (error rows)
    rows_retried: int = 0  # error rows sent again (retry_errors), over every attempt since the stage was complete
    rows_recovered: int = 0  # of those, rows that succeeded and moved into the parts
    shards_changed: list[str] = field(default_factory=list)  # shards whose part rows a retry changed

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the whole stage wall time (start-up included)."""
        return self.generated_tokens / self.llm_s if self.llm_s > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float:
        """Generated tokens per second once the engine is up (first output batch to last)."""
        span = self.llm_s - self.first_output_s
        return self.steady_tokens / span if span > 0 else 0.0

    def as_dict(self) -> dict:
        return {"shards_done_before": self.shards_done_before, "shards_run": self.shards_run,
                "rows_sent": self.rows_sent, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "llm_s": round(self.llm_s, 3),
                "first_output_s": round(self.first_output_s, 3), "tokens_per_s": round(self.tokens_per_s, 1),
                "steady_tokens_per_s": round(self.steady_tokens_per_s, 1), "model": self.model,
                "repeats_dropped": self.repeats_dropped, "conflicting_rows": self.conflicting_rows,
                "rows_retried": self.rows_retried, "rows_recovered": self.rows_recovered,
                "shards_changed": list(self.shards_changed)}


def run_llm_shards(
    stage: StageDir,
    rows: pa.Table,
    shards: list[str],
    task: LLMTask,
    *,
    batch_invariant: bool = True,
    engines: EnginePool | None = None,
    retry_errors: bool = False,
) -> LLMStageStats:
    """Generate for every pending shard of ``rows`` (and, with ``retry_errors``, the error rows of finished shards)
    and commit each shard through ``task.postprocess``.

    Args:
        stage: the stage folder (already ``begin``-ed).
        rows: every input row of the stage, with ``task.id_column`` and ``shard`` (string) columns.
        shards: every shard the stage must end up with (shards without rows get an empty part).
        task: engine, prompt builder, postprocess and id columns.
        batch_invariant: run the engine in batch-invariant mode (:func:`batch_invariant_engine`).
        engines: the run's shared engines (one per model; ``reasonembed.llm.engine_pool``); None starts a pipeline-
            local actor pool as ``ray.data.llm`` does.
        retry_errors: also re-send the error rows of shards finished before (see the module docstring).
    """
    done = stage.done_shards()
    stats = LLMStageStats(shards_done_before=len(done & set(shards)), model=model_record(task.engine))
    apply_retries(stage, task)  # a killed retry's journals first: the parts and error files are then consistent
    pending = [s for s in shards if s not in done]
    by_shard = _split_by_shard(rows, pending)
    empty = rows.slice(0, 0)
    for s in [s for s in pending if s not in by_shard]:
        _commit(stage, s, empty.append_column("generated_text", pa.array([], pa.string())), task.postprocess)
        stats.shards_run += 1
    retry = _retry_rows(stage, rows, [s for s in shards if s in done], task) if retry_errors else {}
    todo = {s: with_input_keys(t) for s, t in {**by_shard, **retry}.items()}
    if todo:
        _generate(stage, todo, set(retry), task, stats, batch_invariant, engines)
    _retry_stats(stage, task, stats)
    return stats


def _generate(stage: StageDir, todo: dict[str, pa.Table], retried: set[str], task: LLMTask, stats: LLMStageStats,
              batch_invariant: bool, engines: EnginePool | None) -> None:
    """One generation pipeline over every shard of ``todo``; commits pending shards and journals retried ones."""
    import ray

    from reasonembed.llm import generate

    stats.rows_sent = sum(t.num_rows for t in todo.values())
    log.info("%s: %d rows in %d shards to generate (%d shards done before%s)", stage.stage, stats.rows_sent,
             len(todo), stats.shards_done_before, f", {len(retried)} with error rows to retry" if retried else "")
    ds = ray.data.from_arrow(list(todo.values()))
    out = generate(ds, stage_engine(task.engine, batch_invariant), task.build_messages, id_column=task.id_column,
                   keep_columns=[*task.keep_columns, INPUT_KEY], engines=engines, stage_name=stage.stage)

    def commit(shard: str, table: pa.Table) -> None:
        if shard in retried:
            _journal(stage, shard, table, task)
        else:
            _commit(stage, shard, table, task.postprocess)

    bar = progress.step(stage.stage, total=stats.rows_sent, unit="rows")
    collector = Collector(stage.stage, todo, task.id_column, stats, commit, bar)
    t0 = time.time()
    try:
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.feed(batch, time.time() - t0)
    finally:
        bar.close(ok=collector.missing() == {})
    stats.llm_s = time.time() - t0
    missing = collector.missing()
    if missing:
        raise RuntimeError(f"{stage.stage}: the engine returned no output for some rows (shard: missing rows) "
                           f"{missing}; re-run to retry these shards")


def with_input_keys(rows: pa.Table) -> pa.Table:
    """``rows`` plus :data:`INPUT_KEY`, a digest of each row's input columns (carried through generation)."""
    if INPUT_KEY in rows.column_names:
        return rows
    cols = [rows[c].to_pylist() for c in rows.column_names]
    keys = [content_key(*vals) for vals in zip(*cols, strict=True)] if cols else []
    return rows.append_column(INPUT_KEY, pa.array(keys, pa.string()))


def resolve_repeats(table: pa.Table, id_column: str) -> tuple[pa.Table, int, int]:
    """Apply ``reasonembed.repeats``' rule to one shard's generated rows: identical repeats (same id, same input key)
    are dropped; each distinct input of an id seen with several inputs becomes one error row (``CONFLICTING_ID``),
    its generated text discarded. Returns (rows, repeats dropped, conflicting rows)."""
    ids = table[id_column].to_pylist()
    keys = table[INPUT_KEY].to_pylist()
    keep, repeats, conflicts = split_repeats(ids, keys)
    first: dict[tuple[str, str], int] = {}
    for i in conflicts:
        first.setdefault((ids[i], keys[i]), i)
    good = table.take(pa.array(keep, pa.int64()))
    dropped = len(repeats) + len(conflicts) - len(first)
    if not first:
        return good, dropped, 0
    inputs_per_id: dict[str, int] = defaultdict(int)
    for row_id, _ in first:
        inputs_per_id[row_id] += 1
    bad = table.take(pa.array(sorted(first.values()), pa.int64()))
    bad_ids = bad[id_column].to_pylist()
    replace = {
        "generated_text": [""] * len(bad_ids),
        "error": [CONFLICTING_ID] * len(bad_ids),
        "error_detail": [f"id {i} came with {inputs_per_id[i]} different inputs" for i in bad_ids],
    }
    for name, values in replace.items():
        if name in bad.column_names:
            bad = bad.set_column(bad.column_names.index(name), name, pa.array(values, pa.string()))
        else:  # outputs without an error column: give both tables one, empty for the good rows
            bad = bad.append_column(name, pa.array(values, pa.string()))
            good = good.append_column(name, pa.array([""] * good.num_rows, pa.string()))
    return pa.concat_tables([good, bad], promote_options="permissive"), dropped, len(first)


class Collector:
    """Groups streamed generation output by shard and commits each shard once every (id, input) pair is back."""

    def __init__(self, name: str, todo: dict[str, pa.Table], id_column: str, stats: LLMStageStats,
                 commit: Callable[[str, pa.Table], None], bar) -> None:
        self.name, self.id_column, self.stats, self.commit, self.bar = name, id_column, stats, commit, bar
        self.expected = {s: len(set(zip(t[id_column].to_pylist(), t[INPUT_KEY].to_pylist(), strict=True)))
                         for s, t in todo.items()}
        self.got: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, set] = defaultdict(set)
        self.committed: set[str] = set()

    def feed(self, batch: pa.Table, elapsed: float) -> None:
        """Take one output batch (``elapsed``: seconds since the pipeline was submitted)."""
        if not self.stats.first_output_s:
            self.stats.first_output_s = elapsed
        else:
            self.stats.steady_tokens += int(pc.sum(batch["num_generated_tokens"]).as_py() or 0)
        for s in pc.unique(batch["shard"]).to_pylist():
            self._add(s, batch.filter(pc.equal(batch["shard"], s)))

    def _add(self, s: str, part: pa.Table) -> None:
        if s in self.committed:  # a late repeat of a committed shard (Ray re-ran a task): already in the part
            self.stats.repeats_dropped += part.num_rows
            return
        pairs = zip(part[self.id_column].to_pylist(), part[INPUT_KEY].to_pylist(), strict=True)
        fresh = []
        for i, pair in enumerate(pairs):
            if pair not in self.seen[s]:
                self.seen[s].add(pair)
                fresh.append(i)
        if len(fresh) < part.num_rows:
            log.warning("%s shard %s: %d repeated rows dropped", self.name, s, part.num_rows - len(fresh))
            self.stats.repeats_dropped += part.num_rows - len(fresh)
            part = part.take(pa.array(fresh, pa.int64()))
        self.bar.update(part.num_rows)
        self.got[s].append(part)
        self.stats.prompt_tokens += int(pc.sum(part["num_input_tokens"]).as_py() or 0)
        self.stats.generated_tokens += int(pc.sum(part["num_generated_tokens"]).as_py() or 0)
        if len(self.seen[s]) == self.expected[s]:
            table, _, conflicts = resolve_repeats(pa.concat_tables(self.got.pop(s), promote_options="permissive"),
                                                  self.id_column)
            if conflicts:
                log.warning("%s shard %s: %d rows share an id with another input (error rows)", self.name, s,
                            conflicts)
            self.stats.conflicting_rows += conflicts
            self.commit(s, table)
            self.committed.add(s)
            self.stats.shards_run += 1
            self.bar.set_postfix(f"{len(self.committed)}/{len(self.expected)} shards")

    def missing(self) -> dict[str, int]:
        """Shards not committed: how many of their (id, input) pairs never came back."""
        return {s: n - len(self.seen[s]) for s, n in self.expected.items() if s not in self.committed}


def parse_failures(errors: pa.Table, rows_out: int) -> dict:
    """``parse_failures`` (error rows whose text came back but did not parse) and ``parse_failure_rate`` (over the
    rows the engine answered: parsed + unparseable; requests that never reached or failed in the engine are not
    parse failures)."""
    from reasonembed.llm.prompts import BAD_INPUT, ENGINE_ERROR, PROMPT_TOO_LONG

    not_parse = {BAD_INPUT, ENGINE_ERROR, PROMPT_TOO_LONG}
    n = sum(1 for r in (errors["reason"].to_pylist() if errors.num_rows else []) if r not in not_parse)
    answered = rows_out + n
    return {"parse_failures": n, "parse_failure_rate": round(n / answered, 4) if answered else 0.0}


def llm_result(stage: StageDir, rows_in: int, stats: LLMStageStats,
               extra_of: Callable[[pa.Table], dict]) -> StageResult:
    """The result of an LLM stage from its committed parts and error rows: counts, errors by reason, the run's
    stats and parse failures plus ``extra_of(parts)``, and the shards a retry changed (its lineage)."""
    out, errors = stage.read_parts(), stage.read_errors()
    reasons = dict(Counter(errors["reason"].to_pylist())) if errors.num_rows else {}
    return StageResult(rows_in=rows_in, rows_out=out.num_rows, rows_error=errors.num_rows, errors_by_reason=reasons,
                       extra={**stats.as_dict(), **parse_failures(errors, out.num_rows), **extra_of(out)},
                       shards_changed=list(stats.shards_changed))


def run_llm_stage(ctx: Context, name: str, rows: pa.Table, task: LLMTask,
                  extra_of: Callable[[pa.Table], dict]) -> StageResult:
    """Run ``task`` over ``rows`` as stage ``name`` in every shard the prepare stage finished (``run_llm_shards``:
    one part per shard, resumable, errors kept as rows) and return the stage's result (``llm_result``)."""
    stage = ctx.stage(name)
    stats = run_llm_shards(stage, rows, sorted(ctx.stage("prepare").done_shards()), task,
                           batch_invariant=ctx.cfg.batch_invariant, engines=ctx.engines,
                           retry_errors=ctx.cfg.retry_errors)
    return llm_result(stage, rows.num_rows, stats, extra_of)


def model_record(engine: LLMEngineConfig) -> dict:
    """The model a stage ran, for its manifest: reference, resolved folder, weights fingerprint, effective dtype.

    Remote sources (hub names, s3://) are recorded as given with no fingerprint: their bytes are only on the engine
    nodes.
    """
    from pathlib import Path

    from reasonembed.llm.engine_args import engine_kwargs, resolve_model_source
    from reasonembed.models.fingerprint import model_fingerprint

    source = resolve_model_source(engine.model)
    local = Path(source).is_dir()
    return {"reference": engine.model, "resolved": source,
            "fingerprint": model_fingerprint(source) if local else None,
            "dtype": engine_kwargs(engine)["dtype"]}


def batch_invariant_engine(engine: LLMEngineConfig) -> LLMEngineConfig:
    """An engine whose outputs do not depend on batch composition (exact re-generation after a kill).

    Seeds alone are not enough: vLLM batches requests, and a batch of another size or make-up rounds differently,
    which can flip a sampled token (measured here: one of six tiny-model queries differed after a resume). GPU:
    vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT=1`` in the engine actors' environment). CPU, which has no
    such kernels: one sequence per engine step (``max_num_seqs=1``), prefix caching and chunked prefill off, so every
    request is computed with the same shapes whatever else is queued. Only these keys are added; the step budget
    that whole-prompt prefill needs comes from the one engine builder (``reasonembed.llm.engine_args.engine_kwargs``), as
    for any other engine. Keys set in engine_kwargs win.
    """
    if engine.on_cpu:
        kwargs = {"max_num_seqs": 1, "enable_prefix_caching": False, "enable_chunked_prefill": False,
                  **engine.engine_kwargs}
        return engine.model_copy(update={"engine_kwargs": kwargs})
    env = dict(engine.runtime_env or {})
    env["env_vars"] = {"VLLM_BATCH_INVARIANT": "1", **dict(env.get("env_vars") or {})}
    return engine.model_copy(update={"runtime_env": env})


def stage_engine(engine: LLMEngineConfig, batch_invariant: bool) -> LLMEngineConfig:
    """The engine an LLM stage runs: ``engine``, batch-invariant when asked (its engine arguments are then built by
    ``reasonembed.llm.engine_args.engine_kwargs`` like a direct ``generate()``'s)."""
    return batch_invariant_engine(engine) if batch_invariant else engine


def _split_by_shard(rows: pa.Table, shards: list[str]) -> dict[str, pa.Table]:
    wanted = set(shards)
    out = {}
    for s in pc.unique(rows["shard"]).to_pylist():
        if s in wanted:
            out[s] = rows.filter(pc.equal(rows["shard"], s))
    return out


def _commit(stage: StageDir, shard: str, generated: pa.Table, postprocess: Postprocess) -> None:
    """Errors first, then the part (which marks the shard done). The error table is written even when empty: that
    removes the error file an interrupted earlier attempt of the shard may have left, so the stage's counts add up
    (rows_out + rows_error == rows_in)."""
    part, errors = postprocess(shard, generated)
    if not isinstance(errors, pa.Table) or not isinstance(part, pa.Table):
        raise TypeError(f"{stage.stage}: postprocess must return (part table, error table), both with a schema")
    stage.write_errors(errors, shard)
    stage.write_part(part, shard)


# -- retrying error rows ---------------------------------------------------------------------------------------------
def _retry_rows(stage: StageDir, rows: pa.Table, finished: list[str], task: LLMTask) -> dict[str, pa.Table]:
    """Input rows of the error rows of ``finished`` shards, by shard."""
    if task.part_id is None or task.error_id is None:
        raise ValueError(f"{stage.stage}: this stage's error rows cannot be retried (no part/error id columns)")
    errors = stage.read_errors()
    if errors.num_rows == 0 or not finished:
        return {}
    ids = pa.array(sorted(set(errors[task.error_id].to_pylist())), pa.string())
    wanted = rows.filter(pc.is_in(rows[task.id_column], value_set=ids))
    return _split_by_shard(wanted, finished)


def _journals(stage: StageDir) -> dict[str, list[str]]:
    """Journal file names by shard, in attempt order."""
    out: dict[str, list[str]] = defaultdict(list)
    for name in stage.list(RETRY_DIR, ".parquet"):
        out[name.rsplit(".", 2)[0]].append(name)
    return {s: sorted(names) for s, names in out.items()}


def _journal(stage: StageDir, shard: str, generated: pa.Table, task: LLMTask) -> None:
    """Write a retried shard's resolved generated rows as its next journal, then apply it."""
    attempt = len(_journals(stage).get(shard, []))
    name = f"{shard}.{attempt:04d}.parquet"
    stage.write_table(posixpath.join(RETRY_DIR, name), generated)
    _apply_journal(stage, shard, name, task)


def _apply_journal(stage: StageDir, shard: str, name: str, task: LLMTask) -> tuple[int, int]:
    """Replace the retried rows of a shard by their new outcome (idempotent); returns (retried, recovered)."""
    generated = stage.read_table(posixpath.join(RETRY_DIR, name))
    good, bad = task.postprocess(shard, generated)
    retried = pa.array(sorted(set(generated[task.id_column].to_pylist())), pa.string())
    part = stage.read_table(stage.part_name(shard))
    part = part.filter(pc.invert(pc.is_in(part[task.part_id], value_set=retried)))
    part = pa.concat_tables([part, good.cast(part.schema)]).sort_by(task.part_id)
    err_name = posixpath.join("errors", stage.part_name(shard))
    errors = bad
    if stage.exists(err_name):
        old = stage.read_table(err_name)
        old = old.filter(pc.invert(pc.is_in(old[task.error_id], value_set=retried)))
        errors = pa.concat_tables([old, bad.cast(old.schema)]).sort_by(task.error_id)
    stage.write_part(part, shard)
    stage.write_errors(errors, shard)
    return generated.num_rows, good.num_rows


def apply_retries(stage: StageDir, task: LLMTask) -> None:
    """Re-apply every retry journal of the stage, in order (a no-op after a clean finish: there are none)."""
    for shard, names in _journals(stage).items():
        if stage.has_shard(shard):
            for name in names:
                _apply_journal(stage, shard, name, task)


def _retry_stats(stage: StageDir, task: LLMTask, stats: LLMStageStats) -> None:
    """Retried and recovered rows, and the shards whose parts changed, from the journals (every attempt)."""
    changed = set()
    for shard, names in _journals(stage).items():
        for name in names:
            generated = stage.read_table(posixpath.join(RETRY_DIR, name))
            good, _ = task.postprocess(shard, generated)
            stats.rows_retried += generated.num_rows
            stats.rows_recovered += good.num_rows
            if good.num_rows:
                changed.add(shard)
    stats.shards_changed = sorted(changed)


def clear_retries(stage: StageDir, shards: list[str] | None = None) -> None:
    """Drop the retry journals (all, or those of ``shards``): once the manifest records them, or when shards are
    redone from scratch."""
    if shards is None:
        stage.delete(RETRY_DIR)
        return
    for shard, names in _journals(stage).items():
        if shard in shards:
            for name in names:
                stage.delete(posixpath.join(RETRY_DIR, name))
