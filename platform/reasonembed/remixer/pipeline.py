"""ReMixer end to end: ``run(cfg) -> summary`` is the library entry of `reasonembed synthesize` and
jobs/synthesize.py.

    prepare ─► generate ─► reason (q') ─► mine ─► annotate ─► format ─► report
    (driver)   vLLM actors  vLLM actors    encoder actors    vLLM actors  (driver)
                                           + FAISS (driver)

Each stage is skipped when its manifest matches its hash (``remixer.context``), otherwise it resumes by shard.
Killing the driver (or an actor) at any point and re-running yields exactly the rows of an uninterrupted run:
stage inputs are finished upstream stages, ids are content hashes, shards are committed atomically, and vLLM
sampling is seeded per row (see ``remixer.llm_stage`` and ``remixer.ids``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from reasonembed.config.synthesize import SynthesizeJobConfig
from reasonembed.remixer import annotate, generate, mine, prepare, report
from reasonembed.remixer import format as format_stage
from reasonembed.remixer.context import Context

log = logging.getLogger("reasonembed.remixer")


def _run_stage(ctx: Context, name: str, h: str, fn: Callable[[], Any]) -> dict[str, Any]:
    """Skip a finished stage, else begin (or resume) it, run it and write its manifest."""
    stage = ctx.stage(name)
    if stage.is_done(h):
        log.info("synthesize/%s: complete with this config, skipped", name)
        return {"skipped": True}
    stage.begin(h, overwrite=ctx.cfg.overwrite)
    t0 = time.time()
    out = fn()
    fields = out[0] if isinstance(out, tuple) else out
    m = stage.write_manifest(config_hash=h, **fields)
    log.info("synthesize/%s: %d in -> %d out, %d errors %s (%.1f s)", name, m.rows_in, m.rows_out, m.rows_error,
             m.errors_by_reason or "", time.time() - t0)
    return {"skipped": False}


def run(cfg: SynthesizeJobConfig) -> dict[str, Any]:
    """Run (or resume) the whole synthesis; returns the report (also written to ``synthesize/report.json``)."""
    from reasonembed.runtime import apply_env_defaults, connect_ray

    apply_env_defaults()
    t0 = time.time()
    ctx = Context.open(cfg)
    connect_ray(cfg.ray)
    h = ctx.hashes
    h["prepare"] = prepare.hash_of(ctx)
    ran = {"prepare": _run_stage(ctx, "prepare", h["prepare"], lambda: prepare.run(ctx, h["prepare"]))}
    h["generate"] = generate.hash_generate(ctx, h["prepare"])
    ran["generate"] = _run_stage(ctx, "generate", h["generate"], lambda: generate.run_generate(ctx, h["generate"]))
    upstream = h["generate"]
    if cfg.reasoning.enabled:
        h["reason"] = generate.hash_reason(ctx, h["generate"])
        ran["reason"] = _run_stage(ctx, "reason", h["reason"], lambda: generate.run_reason(ctx, h["reason"]))
        upstream = h["reason"]
    h["mine"] = mine.hash_mine(ctx, upstream)
    ran["mine"] = _run_stage(ctx, "mine", h["mine"], lambda: mine.run(ctx, h["mine"]))
    h["annotate"] = annotate.hash_annotate(ctx, h["mine"])
    ran["annotate"] = _run_stage(ctx, "annotate", h["annotate"], lambda: annotate.run(ctx, h["annotate"]))
    h["format"] = format_stage.hash_format(ctx, h["annotate"])
    ran["format"] = _run_stage(ctx, "format", h["format"], lambda: format_stage.run(ctx, h["format"]))
    summary = report.write(ctx)
    summary["skipped_stages"] = [k for k, v in ran.items() if v["skipped"]]
    summary["stage_hashes"] = dict(h)
    summary["wall_s"] = round(time.time() - t0, 2)
    for line in report.summary_lines(summary):
        log.info("%s", line)
    return summary
