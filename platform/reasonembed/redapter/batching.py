"""Groups and domain batches for Redapter training (docs/training.md; the paper's ``same_dataset_within_batch``).

Schedule (identical on every rank, because it depends only on the data, the seed and the epoch):

1. Per domain, the rows are shuffled with ``rng(seed, epoch)`` and cut into global batches of
   ``batch_size × world_size`` queries (``batch_size`` is per device, as in the public release and FlagEmbedding).
   A remainder smaller than one global batch is left out of this epoch and counted (``dropped``); a different
   shuffle next epoch leaves out different rows.
2. The global batches of all domains are shuffled together, so steps alternate between domains, but each global
   batch (and hence each softmax over cross-device negatives) holds one domain.
3. Rank r takes rows ``[r·B, (r+1)·B)`` of each global batch. Ranks never talk to agree on a schedule: they all
   compute the same one.

Groups. For each query: 1 positive drawn from ``pos`` and ``G − 1`` negatives drawn without replacement from ``neg``;
when ``neg`` has fewer than ``G − 1`` entries, the list is repeated ⌈(G−1)/|neg|⌉ times before drawing, so each
negative appears at most that many times (the group is counted as repeated, and logged). The draw uses
``rng(seed, epoch, row)``, so a query's group does not depend on the rank or the world size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.data.types import DataError
from reasonembed.redapter.data import TrainDataConfig, TrainingData

log = logging.getLogger(__name__)

__all__ = ["DomainPlan", "GlobalBatch", "LocalBatch", "BatchPlanner", "TrainDataConfig", "sample_group"]


@dataclass(frozen=True)
class DomainPlan:
    """One domain's sizes and rows (indices into ``TrainingData.table``)."""

    name: str
    group_size: int
    batch_size: int  # queries per device
    rows: np.ndarray
    n_without_reasoning: int


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step: ``world_size × batch_size`` rows of one domain."""

    step: int
    domain: str
    group_size: int
    rows: np.ndarray


@dataclass
class LocalBatch:
    """This rank's share of a global batch, as texts.

    ``passages`` has ``len(queries) × group_size`` entries laid out per query as ``[pos, neg_1 … neg_{G-1}]``,
    the layout ``RIInfoNCELoss`` expects. Queries are raw; the trainer formats them with ``prompts``
    (``Instruct: {prompt}\\nQuery: {query}``).
    """

    epoch: int
    step: int
    domain: str
    group_size: int
    sample_ids: list[str]
    prompts: list[str]
    queries: list[str]
    reasoning_queries: list[str | None]
    passages: list[str]
    n_repeated_groups: int = 0

    @property
    def has_reasoning(self) -> list[bool]:
        return [bool(r and r.strip()) for r in self.reasoning_queries]

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class EpochStats:
    """What building one epoch's schedule counted (the same on every rank)."""

    steps: int = 0
    queries: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out (remainder < one global batch)
    steps_per_domain: dict[str, int] = field(default_factory=dict)


def sample_group(n_pos: int, n_neg: int, group_size: int, rng: np.random.Generator) -> tuple[int, list[int], bool]:
    """(positive index, negative indices, repeated?) for one query; see the module docstring."""
    if n_pos < 1 or (group_size > 1 and n_neg < 1):
        raise ValueError(f"cannot build a group of {group_size} from {n_pos} positives and {n_neg} negatives")
    pos = int(rng.integers(n_pos))
    k = group_size - 1
    if k == 0:
        return pos, [], False
    if n_neg >= k:
        return pos, rng.choice(n_neg, size=k, replace=False).tolist(), False
    pool = np.tile(np.arange(n_neg), math.ceil(k / n_neg))
    return pos, rng.choice(pool, size=k, replace=False).tolist(), True


class BatchPlanner:
    """Deterministic per-domain global batches, sharded across ranks (see the module docstring).

    Example::

        data = read_training_data(TrainDataConfig(paths=["runs/r1/synthesize/format"]))
        planner = BatchPlanner(data, cfg, world_size=ray.train.get_context().get_world_size(),
                               rank=ray.train.get_context().get_world_rank(), seed=42)
        for batch in planner.iter_epoch(epoch=0, start_step=resume_step):
            ...  # batch.queries, batch.passages, batch.has_reasoning
    """

    def __init__(self, data: TrainingData, cfg: TrainDataConfig, world_size: int = 1, rank: int = 0, seed: int = 42):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world_size {world_size}")
        self.data, self.cfg = data, cfg
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.domains = self._plan_domains()
        self._schedules: dict[int, tuple[list[GlobalBatch], EpochStats]] = {}
        self.n_groups = 0
        self.n_repeated_groups = 0

    # -- plan -----------------------------------------------------------------------------------------------
    def _plan_domains(self) -> dict[str, DomainPlan]:
        t = self.data.table
        domains = np.asarray(t["domain"].to_pylist(), dtype=object)
        groups = t["train_group_size"].to_numpy(zero_copy_only=False)
        batches = t["batch_size"].to_numpy(zero_copy_only=False)
        has_rq = np.asarray(self.data.has_reasoning().to_pylist(), dtype=bool)
        plans = {}
        for name in sorted(set(domains.tolist())):
            rows = np.flatnonzero(domains == name)
            g = self.cfg.train_group_size or _one_value(groups[rows], name, "train_group_size",
                                                        self.cfg.default_train_group_size)
            b = self.cfg.batch_size or _one_value(batches[rows], name, "batch_size", self.cfg.default_batch_size)
            plans[name] = DomainPlan(name, g, b, rows, int((~has_rq[rows]).sum()))
            if plans[name].n_without_reasoning:
                log.warning("domain %s: %d of %d samples have no reasoning_query (trained with basic InfoNCE)",
                            name, plans[name].n_without_reasoning, len(rows))
        return plans

    def schedule(self, epoch: int = 0) -> tuple[list[GlobalBatch], EpochStats]:
        """The global batches of ``epoch`` and what building them counted (cached)."""
        if epoch not in self._schedules:
            self._schedules[epoch] = self._build(epoch)
        return self._schedules[epoch]

    def _build(self, epoch: int) -> tuple[list[GlobalBatch], EpochStats]:
        rng = np.random.default_rng([self.seed, epoch])
        stats = EpochStats()
        pending: list[tuple[str, int, np.ndarray]] = []
        for name, plan in self.domains.items():  # sorted by name: same draw order everywhere
            size = plan.batch_size * self.world_size
            order = rng.permutation(plan.rows)
            n_full = len(order) // size
            stats.dropped[name] = len(order) - n_full * size
            stats.steps_per_domain[name] = n_full
            pending.extend((name, plan.group_size, order[i * size:(i + 1) * size]) for i in range(n_full))
            if n_full == 0:
                log.warning("domain %s: %d samples < one global batch (%d x %d ranks); it is not trained on",
                            name, len(order), plan.batch_size, self.world_size)
        perm = rng.permutation(len(pending))
        batches = [GlobalBatch(step, *pending[j]) for step, j in enumerate(perm.tolist())]
        stats.steps = len(batches)
        stats.queries = sum(len(b.rows) for b in batches)
        if not batches:
            raise DataError(
                f"no domain has enough samples for one global batch with world_size {self.world_size}: "
                + ", ".join(f"{n} {len(p.rows)} < {p.batch_size * self.world_size}" for n, p in self.domains.items())
                + "; lower batch_size or add data"
            )
        dropped = sum(stats.dropped.values())
        if dropped:
            log.info("epoch %d: %d steps; %d samples left out as per-domain remainders %s",
                     epoch, stats.steps, dropped, {k: v for k, v in stats.dropped.items() if v})
        return batches, stats

    def steps_per_epoch(self) -> int:
        """Constant across epochs: each domain gives ⌊n / (batch_size × world_size)⌋ steps."""
        return self.schedule(0)[1].steps

    # -- materialise ----------------------------------------------------------------------------------------
    def local_rows(self, batch: GlobalBatch) -> np.ndarray:
        b = len(batch.rows) // self.world_size
        return batch.rows[self.rank * b:(self.rank + 1) * b]

    def local_batch(self, batch: GlobalBatch, epoch: int = 0) -> LocalBatch:
        """Texts of this rank's rows, with one positive and G−1 negatives sampled per query."""
        rows = self.local_rows(batch)
        part = self.data.table.take(pa.array(rows, pa.int64()))
        cols = {c: part[c].to_pylist() for c in ("sample_id", "prompt", "query", "reasoning_query")}
        n_pos = pc.list_value_length(part["pos"]).to_pylist()
        n_neg = pc.list_value_length(part["neg"]).to_pylist()
        pos_col, neg_col = part["pos"], part["neg"]
        passages: list[str] = []
        repeated = 0
        for i, row in enumerate(rows.tolist()):
            rng = np.random.default_rng([self.seed, epoch, row])
            p, negs, rep = sample_group(n_pos[i], n_neg[i], batch.group_size, rng)
            passages.append(pos_col[i][p].as_py())
            neg_list = neg_col[i]
            passages.extend(neg_list[j].as_py() for j in negs)
            repeated += rep
        self.n_groups += len(rows)
        self.n_repeated_groups += repeated
        if repeated:
            log.info("step %d (%s): %d of %d groups repeat negatives (fewer than %d negatives)",
                     batch.step, batch.domain, repeated, len(rows), batch.group_size - 1)
        return LocalBatch(
            epoch=epoch, step=batch.step, domain=batch.domain, group_size=batch.group_size,
            sample_ids=cols["sample_id"], prompts=cols["prompt"], queries=cols["query"],
            reasoning_queries=cols["reasoning_query"], passages=passages, n_repeated_groups=repeated,
        )

    def iter_epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[LocalBatch]:
        """This rank's batches of ``epoch`` from ``start_step`` on (resuming skips without sampling)."""
        batches, _ = self.schedule(epoch)
        for batch in batches[start_step:]:
            yield self.local_batch(batch, epoch)


def _one_value(values: np.ndarray, domain: str, name: str, default: int) -> int:
    """The single per-domain value of a size column (None/NaN rows ignored); conflicting values are an error."""
    seen = sorted({int(v) for v in values.tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))})
    if not seen:
        return default
    if len(seen) > 1:
        raise DataError(
            f"domain {domain!r}: rows disagree on {name} ({seen}); a domain's batches need one value. Fix the data "
            f"or set {name} in the training data config to override it for every domain"
        )
    return seen[0]
