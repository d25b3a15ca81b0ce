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
from reasonembed.llm.engine_pool import EnginePool
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
    plan = [
        ("prepare", lambda up: prepare.hash_of(ctx), prepare.run),
        ("generate", lambda up: generate.hash_generate(ctx, up), generate.run_generate),
        ("reason", lambda up: generate.hash_reason(ctx, up), generate.run_reason),
        ("mine", lambda up: mine.hash_mine(ctx, up), mine.run),
        ("annotate", lambda up: annotate.hash_annotate(ctx, up), annotate.run),
        ("format", lambda up: format_stage.hash_format(ctx, up), format_stage.run),
    ]
    ran: dict[str, dict] = {}
    upstream = ""
    ctx.engines = EnginePool() if cfg.share_engines else None
    try:
        for name, hash_fn, run_fn in plan:
            if name == "reason" and not cfg.reasoning.enabled:
                continue
            h[name] = upstream = hash_fn(upstream)
            ran[name] = _run_stage(ctx, name, upstream, lambda fn=run_fn, hh=upstream: fn(ctx, hh))
            if name == cfg.stop_after:
                log.info("synthesize: stop_after=%s reached", name)
                break
    finally:
        engines = ctx.engines.summary() if ctx.engines is not None else []
        if ctx.engines is not None:
            ctx.engines.close()
    summary = report.build(ctx)
    summary["skipped_stages"] = [k for k, v in ran.items() if v["skipped"]]
    summary["stage_hashes"] = dict(h)
    summary["engines"] = engines
    summary["wall_s"] = round(time.time() - t0, 2)
    summary = report.write(ctx, summary)
    for line in report.summary_lines(summary):
        log.info("%s", line)
    return summary
