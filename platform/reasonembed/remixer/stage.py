"""The ReMixer stage protocol: what the pipeline (``remixer.pipeline``) loops over.

A stage (:class:`Stage`) has

- a ``name`` (its folder ``synthesize/<name>``), the finished stages it reads (``upstream``) and the columns it
  requires of each (``requires``: ``{upstream stage: {column: description}}``, as Ray Data's LLM stages declare
  ``get_required_input_keys()``), checked on entry by :meth:`Stage.read_input` / :meth:`Stage.read_pool`, which
  refuse an input lacking one of them with an error naming the stage, the input and the missing columns
  (``reasonembed.schemas.require_columns``) instead of failing later on a missing key;
- a :meth:`Stage.fingerprint` over its config and inputs (:class:`Fingerprint`): the config hash chains the hash of
  the stage run before it (``remixer.context``), and the inputs are the files or models it reads plus
  ``upstream:<stage>`` -> each upstream stage's output fingerprint;
- :meth:`Stage.run` ``(ctx) -> StageResult``: rows in, out and in error, errors by reason, the stats kept in the
  manifest's ``extra``, and the shards whose rows a retry changed (the stage's lineage).

The pipeline decides reuse, refusal, redo and retry from the fingerprint and writes the manifest from the result;
a stage only does its work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from reasonembed.remixer.context import STAGE_ROOT, Context
from reasonembed.remixer.ids import stage_hash
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


@dataclass(frozen=True)
class Fingerprint:
    """What decides whether a finished stage is reused: ``config`` (the manifest's ``config_hash``) and ``inputs``
    (fingerprints of what it reads; a change is refused naming the input, ``StageDir.is_done``)."""

    config: str
    inputs: dict[str, str]


@dataclass
class StageResult:
    """What one run of a stage did, as its manifest records it."""

    rows_in: int
    rows_out: int
    rows_error: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the stage's stats, kept in the manifest
    shards_changed: list[str] = field(default_factory=list)  # shards whose rows a retry of error rows changed

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest fields of this result (the pipeline adds the config hash and the lineage)."""
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "rows_error": self.rows_error,
                "errors_by_reason": dict(self.errors_by_reason), "extra": dict(self.extra)}


class Stage(ABC):
    """One ReMixer stage (module docstring). Subclasses set the class attributes and implement ``settings`` and
    ``run``; ``own_inputs`` and ``enabled`` have defaults."""

    name: ClassVar[str]
    upstream: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[Requires] = {}
    retryable: ClassVar[bool] = False  # retry_errors re-sends its error rows (LLM stages)
    chained: ClassVar[bool] = True  # its config hash chains the previous stage's (False for the first stage)

    def enabled(self, ctx: Context) -> bool:
        """Whether the pipeline runs this stage under ``ctx.cfg``."""
        return True

    @abstractmethod
    def settings(self, ctx: Context) -> list[Any]:
        """The settings that determine the stage's rows (hashed into the config part of its fingerprint)."""

    def own_inputs(self, ctx: Context) -> dict[str, str]:
        """Fingerprints of the files or models the stage reads itself (``reasonembed.input_fingerprint``)."""
        return {}

    def inputs(self, ctx: Context) -> dict[str, str]:
        """Its own inputs plus ``upstream:<stage>`` -> the output fingerprint of each upstream stage it reads, which
        changes whenever that stage is redone."""
        out = self.own_inputs(ctx)
        for up in self.upstream:
            if up != "reason" or ctx.cfg.reasoning.enabled:
                out[f"upstream:{up}"] = ctx.stage(up).output_fingerprint()
        return out

    def config_hash(self, ctx: Context) -> str:
        """Hash of its settings chained to the previous stage's hash (``ctx.hashes``, filled by the pipeline in
        order), so a changed setting changes the hash of its stage and of every stage after it."""
        chain = (ctx.previous_hash(self.name),) if self.chained else ()
        return stage_hash(self.name, *chain, *self.settings(ctx))

    def fingerprint(self, ctx: Context) -> Fingerprint:
        """Its config hash and its inputs, as the pipeline checks them for reuse."""
        return Fingerprint(self.config_hash(ctx), self.inputs(ctx))

    @abstractmethod
    def run(self, ctx: Context) -> StageResult:
        """Do (or resume) the stage's work under the fingerprint the pipeline began it with."""

    def read_input(self, ctx: Context, upstream: str, columns: list[str] | None = None) -> pa.Table:
        """``upstream``'s parts, checked against what this stage requires of them (:func:`read_input`)."""
        return read_input(ctx, self.name, self.requires, upstream, columns)

    def read_pool(self, ctx: Context, domain: str) -> pa.Table:
        """The mining pool of ``domain``, checked against what this stage requires of it (:func:`read_pool`)."""
        return read_pool(ctx, self.name, self.requires, domain)
