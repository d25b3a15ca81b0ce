"""What a ReMixer stage reads: finished upstream stages, checked on entry against the columns the stage requires.

Each stage declares its requirements as ``{upstream stage: {column: description}}`` (as Ray Data's LLM stages
declare ``get_required_input_keys()``) and reads its inputs through :func:`read_input` / :func:`read_pool`, which
refuse an input lacking one of them with an error naming the stage, the input and the missing columns
(``reasonembed.schemas.require_columns``) instead of failing later on a missing key.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from reasonembed.remixer.context import STAGE_ROOT, Context
from reasonembed.schemas import require_columns

# upstream stage -> {column: description}
Requires = Mapping[str, Mapping[str, str]]
# What the stages that search or quote the mining pool (mine, annotate, format) require of it.
POOL_COLUMNS = {"doc_id": "pool document id", "text": "pool document text"}


def _check(stage: str, upstream: str, names: list[str], requires: Requires) -> None:
    require_columns(f"{STAGE_ROOT}/{stage}", f"{STAGE_ROOT}/{upstream}", names, requires[upstream])


def read_input(ctx: Context, stage: str, requires: Requires, upstream: str,
               columns: list[str] | None = None) -> pa.Table:
    """The parts of the finished stage ``upstream`` (only ``columns`` when given), once their columns are checked
    against what ``stage`` requires of them. A stage without parts reads as an empty table."""
    up = ctx.stage(upstream)
    parts = up.parts()
    if parts:  # every part of a stage has the same schema: check the first one's, without reading rows
        _check(stage, upstream, pq.read_schema(up._p(parts[0]), filesystem=up.fs).names, requires)
    return up.read_parts(columns=columns)


def read_pool(ctx: Context, stage: str, requires: Requires, domain: str) -> pa.Table:
    """The mining pool of ``domain`` (``synthesize/pool``), checked against what ``stage`` requires of it."""
    pool = ctx.stage("pool")
    table = pool.read_table(pool.part_name(domain))
    _check(stage, "pool", table.column_names, requires)
    return table
