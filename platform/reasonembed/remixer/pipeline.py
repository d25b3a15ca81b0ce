"""ReMixer end to end: ``run(cfg) -> summary`` is the library entry of `reasonembed synthesize` and
jobs/synthesize.py.

    prepare ─► generate ─► reason (q') ─► mine ─► annotate ─► format ─► report
    (driver)   vLLM actors  vLLM actors    encoder actors    vLLM actors  (driver)
                                           + FAISS (driver)

Each stage (``remixer.stage``: a name, a fingerprint, a run) is reused when its manifest matches its fingerprint:
its config hash (``remixer.context``) *and* its inputs (``Stage.inputs``: the corpus and benchmark files for
prepare, the model of an LLM stage or of the miner, and the output fingerprint of every upstream stage it reads) are
unchanged; a stage whose inputs changed is refused with the list of changes
(``overwrite`` redoes it, and then every stage downstream, whose upstream fingerprint changed with it). Otherwise a
stage resumes by shard. Killing the driver (or an actor) at any point and re-running yields exactly the rows of an
uninterrupted run: stage inputs are finished upstream stages, ids are content hashes, shards are committed
atomically, and vLLM sampling is seeded per row (see ``remixer.llm_stage`` and ``remixer.ids``).

``retry_errors`` re-sends the error rows of a finished LLM stage (``llm_stage``, module docstring). The retried stage
records in its manifest's ``extra.lineage`` which shards' rows changed since each earlier output fingerprint, and a
downstream stage whose only changed inputs are upstream stages with such a lineage redoes just those shards (their
parts are deleted and the stage resumes) instead of being refused: the retry's new rows then reach the training
samples without redoing the stages' other shards. The redo is itself recorded (manifest status ``partial`` with
``extra.redo`` until it finishes), so a kill during it resumes it.
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import Any

from reasonembed.config.synthesize import SynthesizeJobConfig
from reasonembed.llm.engine_pool import EnginePool
from reasonembed.remixer import report
from reasonembed.remixer.annotate import ANNOTATE
from reasonembed.remixer.context import Context
from reasonembed.remixer.format import FORMAT
from reasonembed.remixer.generate import GENERATE, REASON
from reasonembed.remixer.llm_stage import clear_retries
from reasonembed.remixer.mine import MINE
from reasonembed.remixer.prepare import PREPARE
from reasonembed.remixer.stage import Fingerprint, Stage
from reasonembed.storage import STAGE_MARKER, StageDir

log = logging.getLogger("reasonembed.remixer")

# The stages in pipeline order, ``remixer.context.STAGES`` (``remixer.stage``: each has a name, a fingerprint and a
# run; the loop below is all the pipeline knows of them).
STAGES: tuple[Stage, ...] = (PREPARE, GENERATE, REASON, MINE, ANNOTATE, FORMAT)


def _recorded_inputs(stage: StageDir, h: str) -> dict[str, str] | None:
    """The inputs the stage's current parts were made from under config ``h`` (its marker, else its manifest)."""
    if stage.exists(STAGE_MARKER):
        marker = stage.read_json(STAGE_MARKER)
        return marker.get("inputs", {}) if marker.get("config_hash") == h else None
    m = stage.read_manifest()
    return m.inputs if m is not None and m.config_hash == h else None


def _redo_plan(ctx: Context, stage: StageDir, h: str, inputs: dict[str, str]) -> dict | None:
    """The shards to redo when the only changed inputs are upstream stages whose lineage names the shards they
    changed since the fingerprint this stage recorded (module docstring); None when there is nothing to redo that
    way (unchanged inputs, or changes only a full redo or a refusal can answer)."""
    recorded = _recorded_inputs(stage, h)
    if recorded is None:
        return None
    changed = [k for k in sorted(set(recorded) | set(inputs)) if recorded.get(k) != inputs.get(k)]
    shards: set[str] = set()
    for key in changed:
        if not key.startswith("upstream:") or key not in recorded or key not in inputs:
            return None
        up = ctx.stage(key.split(":", 1)[1]).read_manifest()
        lineage = up.extra.get("lineage", []) if up is not None else []
        start = next((i for i, e in enumerate(lineage) if e["from"] == recorded[key]), None)
        if start is None:
            return None
        for entry in lineage[start:]:
            shards |= set(entry["shards"])
    if not changed:
        return None
    m = stage.read_manifest()
    if m is not None and m.status == "partial" and "redo" in m.extra:
        prev = m.extra["redo"]
        return {**prev, "shards": sorted(set(prev["shards"]) | shards)}
    complete = m is not None and m.status == "complete"
    return {"from": stage.output_fingerprint() if complete else None,
            "lineage": m.extra.get("lineage", []) if complete else [], "shards": sorted(shards)}


def _mark_partial(stage: StageDir, redo: dict) -> None:
    """Record a redo or retry in progress: the manifest's status becomes ``partial`` (the stage is no longer
    complete, so nothing downstream reuses it) and ``extra.redo`` keeps what its lineage needs."""
    m = stage.read_manifest()
    if m is not None:
        stage.write_manifest(m.model_copy(update={"status": "partial", "extra": {**m.extra, "redo": redo}}))


def _start_redo(stage: StageDir, redo: dict) -> None:
    """Mark the redo, drop the parts and error rows of its shards, and forget the old inputs (``begin`` records the
    new ones); every step is safe to repeat after a kill."""
    _mark_partial(stage, redo)
    for shard in redo["shards"]:
        stage.delete(stage.part_name(shard))
        stage.delete(posixpath.join("errors", stage.part_name(shard)))
    clear_retries(stage, redo["shards"])
    stage.delete(STAGE_MARKER)


def _start_retry(stage: StageDir) -> dict:
    """Mark a retry of a complete stage's error rows (``llm_stage``) and return its redo record."""
    m = stage.read_manifest()
    redo = {"from": stage.output_fingerprint(), "lineage": m.extra.get("lineage", []), "shards": []}
    clear_retries(stage)  # leftovers of an earlier retry, applied and counted before its manifest was written
    _mark_partial(stage, redo)
    return redo


def _prepare_stage(ctx: Context, stage: Stage, fp: Fingerprint) -> tuple[bool, dict | None]:
    """(skip, redo record) for a stage: reuse it, redo some shards, retry its error rows, or (re)run it."""
    folder = ctx.stage(stage.name)
    redo = _redo_plan(ctx, folder, fp.config, fp.inputs)
    if redo is not None:
        if redo["shards"]:
            log.info("synthesize/%s: upstream rows changed in shards %s: redoing them", stage.name, redo["shards"])
        else:
            log.info("synthesize/%s: upstream re-recorded without changed rows: refreshing the manifest", stage.name)
        _start_redo(folder, redo)
        return False, redo
    if folder.is_done(fp.config, fp.inputs, overwrite=ctx.cfg.overwrite):
        if ctx.cfg.retry_errors and stage.retryable and folder.list("errors", ".parquet"):
            log.info("synthesize/%s: complete; retrying its error rows (retry_errors)", stage.name)
            return False, _start_retry(folder)
        return True, None
    m = folder.read_manifest()  # a redo or retry of this config killed midway: resume it
    if m is not None and m.status == "partial" and m.config_hash == fp.config and "redo" in m.extra:
        return False, m.extra["redo"]
    return False, None


def _run_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    """Fingerprint a stage; skip it when finished, else begin (or resume, redo shards of, retry errors of) it, run
    it and write its manifest from its result."""
    fp = stage.fingerprint(ctx)
    ctx.hashes[stage.name] = fp.config  # the next stage's hash chains this one
    skip, redo = _prepare_stage(ctx, stage, fp)
    if skip:
        log.info("synthesize/%s: complete with this config and inputs, skipped", stage.name)
        return {"skipped": True}
    folder = ctx.stage(stage.name)
    folder.begin(fp.config, overwrite=ctx.cfg.overwrite, inputs=fp.inputs)
    t0 = time.time()
    result = stage.run(ctx)
    fields = result.manifest_fields()
    fields["extra"]["lineage"] = _lineage(redo, result.shards_changed)
    m = folder.write_manifest(config_hash=fp.config, **fields)
    clear_retries(folder)  # recorded in the manifest now
    log.info("synthesize/%s: %d in -> %d out, %d errors %s (%.1f s)", stage.name, m.rows_in, m.rows_out,
             m.rows_error, m.errors_by_reason or "", time.time() - t0)
    return {"skipped": False, "redone_shards": redo["shards"] if redo else None}


def _lineage(redo: dict | None, shards_changed: list[str]) -> list[dict]:
    """The stage's lineage: the previous one plus, after a redo or retry, the shards whose rows changed since the
    output fingerprint it replaced."""
    if redo is None or redo["from"] is None:
        return []
    return [*redo["lineage"], {"from": redo["from"], "shards": sorted(set(redo["shards"]) | set(shards_changed))}]


def _run_stages(ctx: Context) -> dict[str, dict]:
    """Every enabled stage in order, up to ``stop_after``; returns what happened to each."""
    ran: dict[str, dict] = {}
    for stage in STAGES:
        if not stage.enabled(ctx):
            continue
        ran[stage.name] = _run_stage(ctx, stage)
        if stage.name == ctx.cfg.stop_after:
            log.info("synthesize: stop_after=%s reached", stage.name)
            break
    return ran


def run(cfg: SynthesizeJobConfig) -> dict[str, Any]:
    """Run (or resume) the whole synthesis; returns the report (also written to ``synthesize/report.json``)."""
    from reasonembed.runtime import apply_env_defaults, connect_ray

    apply_env_defaults()
    t0 = time.time()
    ctx = Context.open(cfg)
    connect_ray(cfg.ray)
    ctx.engines = EnginePool() if cfg.share_engines else None
    try:
        ran = _run_stages(ctx)
    finally:
        engines = ctx.engines.summary() if ctx.engines is not None else []
        if ctx.engines is not None:
            ctx.engines.close()
    summary = report.build(ctx)
    summary["skipped_stages"] = [k for k, v in ran.items() if v["skipped"]]
    summary["redone_shards"] = {k: v["redone_shards"] for k, v in ran.items() if v.get("redone_shards")}
    summary["stage_hashes"] = dict(ctx.hashes)
    summary["engines"] = engines
    summary["wall_s"] = round(time.time() - t0, 2)
    summary = report.write(ctx, summary)
    for line in report.summary_lines(summary):
        log.info("%s", line)
    return summary
