"""The per-worker training loop of Redapter (docs/training.md): batches -> bi-encoder -> RI-InfoNCE -> step.

Every rank runs ``TrainWorker``'s phases over the driver's frozen ``WorkerArgs`` (torchtune's recipe layout):
``setup`` (data, batch plan, model, engine), ``resume`` (the newest complete checkpoint, if any), ``train_epoch``
until the run's last optimizer step, and ``finish`` (rank 0 exports the model). ``run_worker`` strings them
together; ``train_loop_per_worker`` is the Ray Train entry point.

One optimizer step, on every rank r of W:

1. ``BatchPlanner`` gives this rank's B queries of the step's global batch (one domain), each with 1 positive and
   G−1 sampled negatives. Queries become ``Instruct: {prompt}\\nQuery: {query}``; passages get no instruction.
2. One forward of the wrapped ``BiEncoder`` embeds queries [B, D] and passages [B·G, D] (with gradients). From
   ``loss.ri_start_step`` on, the reasoning queries q′ are embedded under ``no_grad`` with the same weights, in
   eval mode (no dropout: RI is a measurement, ``BiEncoder.encode_frozen``).
3. ``RIInfoNCELoss`` gathers all ranks' passages (cross-device negatives), weights each query by its clamped,
   globally normalised RI, and returns the loss to backpropagate.
4. DDP / DeepSpeed average gradients over ranks; clip; AdamW; LR schedule.
5. Rank 0 logs the step; every ``checkpointing.every_n_steps`` all ranks report a checkpoint to Ray Train.

Resuming (a restarted worker group, or the same job submitted again): the checkpoint's ``train_state.json`` must
match this run's fingerprint, then model, optimizer and scheduler state are loaded and the schedule continues at
the saved (epoch, global batch) — never from step 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from reasonembed.config.base import StorageConfig
from reasonembed.config.train import TrainJobConfig
from reasonembed.data.types import DataError
from reasonembed.redapter import faults
from reasonembed.redapter.batching import BatchPlanner, LocalBatch
from reasonembed.redapter.curves import MetricsLog
from reasonembed.redapter.data import ERROR_SCHEMA, TrainingData
from reasonembed.redapter.gather import DistContext, all_reduce_sum
from reasonembed.redapter.loss import LossOutput, RIInfoNCELoss
from reasonembed.redapter.model import ModelBundle, build_bi_encoder
from reasonembed.redapter.session import RaySession, fetched
from reasonembed.redapter.state import (
    STATE_FILE,
    SavedState,
    TrainState,
    check_compatible,
    checkpoint_name,
    fingerprint,
    write_pointer,
)
from reasonembed.redapter.strategies import DeepSpeedEngine, TorchEngine, make_engine

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def data_info(planner: BatchPlanner, data: TrainingData) -> dict[str, Any]:
    """What of the data a resumed run must share: the sample set and the per-domain (group, batch, rows)."""
    ids = sorted(data.table["sample_id"].to_pylist())
    return {
        "samples": data.n_samples,
        "sample_ids_sha": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
        "domains": {n: [p.group_size, p.batch_size, len(p.rows)] for n, p in planner.domains.items()},
    }


def total_steps(planner: BatchPlanner, cfg: TrainJobConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = planner.steps_per_epoch() // cfg.optim.gradient_accumulation_steps
    if per_epoch == 0:
        raise DataError(
            f"one epoch has {planner.steps_per_epoch()} global batches, fewer than "
            f"optim.gradient_accumulation_steps={cfg.optim.gradient_accumulation_steps}: lower it or add data"
        )
    total = per_epoch * cfg.optim.epochs
    return per_epoch, min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total


def format_queries(texts: list[str], prompts: list[str], query_format: str) -> list[str]:
    """``Instruct: {prompt}\\nQuery: {query}`` per row; a row without a prompt is embedded as is."""
    return [query_format.format(task=p, query=q) if p else q for q, p in zip(texts, prompts, strict=True)]


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every training worker (``redapter.trainer.run``; tests build it directly).

    Frozen plain data: Ray Train pickles it to each worker process, and no phase may change what the driver decided.
    """

    job: TrainJobConfig
    table: Any  # the validated samples (pa.Table), or the driver's ObjectRef to it: read once per worker
    run_uri: str  # the run's train folder: step log, events, latest_checkpoint.json
    export_uri: str  # where rank 0 writes the final model
    prompts: dict[str, str]  # sentence-transformers prompts of the exported model (export.st_prompts)
    instruction: str | None = None  # the exported 'query' instruction, recorded in reasonembed.json
    ray_uri: str = ""  # Ray Train's run folder, where reported checkpoints land
    threads: int | None = None  # torch threads of a CPU worker (its CPU resources)
    resume_from: str | None = None  # the driver's checkpoint pick, when Ray Train has none of its own for this run
    fault: dict[str, Any] | None = None  # faults.fault_from_env(): kill a worker once (resume tests)

    @classmethod
    def coerce(cls, args: WorkerArgs | Mapping[str, Any]) -> WorkerArgs:
        """``args`` itself, or one built from a mapping of the same fields (``job`` may be the config's JSON dump)."""
        if isinstance(args, WorkerArgs):
            return args
        return cls(**{**args, "job": TrainJobConfig.model_validate(args["job"])})


def _read_table(table: Any) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    import ray  # an ObjectRef from the driver: read once, shared through the object store

    return ray.get(table)


@dataclass
class StepStats:
    """The per-step state: when the optimizer step started and sums over its global batches (several with gradient
    accumulation)."""

    started: float = field(default_factory=time.time)
    n: int = 0
    loss: float = 0.0
    unweighted: float = 0.0
    queries: int = 0
    passages: int = 0
    tokens: int = 0
    truncated: int = 0
    without_reasoning: int = 0
    repeated: int = 0
    ri: dict[str, list[float]] = field(default_factory=lambda: {"min": [], "max": [], "mean": [], "median": []})
    ri_active: bool = False
    domains: list[str] = field(default_factory=list)

    def add(self, out: LossOutput, counts: torch.Tensor, domain: str) -> None:
        """One global batch: the loss output and the all-ranks [tokens, truncated, passages, repeated groups]."""
        self.n += 1
        self.loss += out.value
        self.unweighted += out.unweighted_loss
        self.queries += out.n_queries
        self.passages += int(counts[2])
        self.tokens += int(counts[0])
        self.truncated += int(counts[1])
        self.repeated += int(counts[3])
        self.without_reasoning += out.n_without_reasoning
        self.ri_active = self.ri_active or out.ri_active
        self.domains.append(domain)
        for k, v in out.ri_stats.items():
            if not math.isnan(v):
                self.ri[k].append(v)

    def row(self, state: TrainState, lr: float, grad_norm: float | None, dt: float) -> dict[str, Any]:
        """The step's line of the step log (``metrics.jsonl``), also reported to Ray Train."""
        ri = self.ri
        return {
            "step": state.global_step - 1,
            "epoch": state.epoch,
            "domain": self.domains[0] if len(set(self.domains)) == 1 else ",".join(self.domains),
            "loss": self.loss / self.n,
            "loss_unweighted": self.unweighted / self.n,
            "ri_active": self.ri_active,
            # Over accumulated batches: min of minima, max of maxima, mean of means and of medians.
            "ri_min": min(ri["min"]) if ri["min"] else None,
            "ri_max": max(ri["max"]) if ri["max"] else None,
            "ri_mean": sum(ri["mean"]) / len(ri["mean"]) if ri["mean"] else None,
            "ri_median": sum(ri["median"]) / len(ri["median"]) if ri["median"] else None,
            "n_without_reasoning": self.without_reasoning,
            "lr": lr,
            "grad_norm": grad_norm,
            "queries": self.queries,
            "passages": self.passages,
            "tokens": self.tokens,
            "truncated": self.truncated,  # inputs cut to max_length (queries and passages, all ranks)
            "repeated_groups": self.repeated,  # queries whose negatives were repeated to fill the group
            "step_time_s": dt,
            "samples_per_s": self.queries / dt if dt > 0 else None,
            "passages_per_s": self.passages / dt if dt > 0 else None,
            "attempt": state.attempt,
            "time": time.time(),
        }


def passage_chunks(p_ids: list[list[int]], rows: int) -> tuple[list[list[int]], list[int]]:
    """Passage indices sorted by length (longest first) and cut into chunks of ``rows`` (0: one chunk), plus the
    inverse permutation that puts the concatenated chunk outputs back in input order.

    Why: padding a step's B x G passages to the single longest one wastes compute, and attention grows with the
    square of the padded length (with dropout, CPU attention runs its unfused path). Measured on ImpliRet posts
    (MiniLM, 16 x 4 per step, 2 threads): 13.6 K padded tokens per step in one pass vs 11.5 K in 4 sorted chunks.
    Each passage's embedding does not depend on its batch-mates, so the loss is unchanged.
    """
    order = sorted(range(len(p_ids)), key=lambda i: (-len(p_ids[i]), i))
    size = rows if rows > 0 else max(1, len(order))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    return chunks, inverse


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=..., train_loop_config={"worker_args": ...})``)."""
    run_worker(config["worker_args"], RaySession())


def run_worker(args: WorkerArgs | Mapping[str, Any], session) -> dict[str, Any]:
    """One rank's run, phase by phase; returns rank-local figures (used by in-process callers).

    ``args`` may also be a mapping of ``WorkerArgs``' fields (``WorkerArgs.coerce``)."""
    worker = TrainWorker(WorkerArgs.coerce(args), session)
    worker.setup()
    worker.resume()
    while not worker.done:
        worker.train_epoch()
    return worker.finish()


class TrainWorker:
    """The training run of one rank (``session``: rank, world size, device, checkpoint restore and report).

    Phases, in order: :meth:`setup`, :meth:`resume`, :meth:`train_epoch` until :attr:`done`, :meth:`finish`.
    ``state`` is where the run stands (saved in checkpoints); ``stats`` the optimizer step in progress.
    """

    precision: str
    planner: BatchPlanner
    per_epoch: int  # optimizer steps per epoch
    total: int  # optimizer steps of the run
    bundle: ModelBundle
    engine: TorchEngine | DeepSpeedEngine  # DDP or DeepSpeed data parallelism
    fp: dict[str, Any]  # the fingerprint a resumed checkpoint must match
    mlog: MetricsLog
    loss_fn: RIInfoNCELoss
    ctx: DistContext

    def __init__(self, args: WorkerArgs, session):
        self.args, self.session, self.cfg = args, session, args.job
        self.rank = session.rank
        self.state = TrainState()
        self.stats = StepStats()
        self.resumed = False

    @property
    def done(self) -> bool:
        return self.state.global_step >= self.total

    def setup(self) -> None:
        """Data, batch plan, step counts, model, engine, loss and fingerprint: nothing that depends on a checkpoint."""
        cfg, device, world = self.cfg, self.session.device, self.session.world_size
        self.precision = resolve_precision(cfg.precision, device)
        if device.type == "cpu" and self.args.threads:
            torch.set_num_threads(int(self.args.threads))
        data = TrainingData(table=_read_table(self.args.table), errors=ERROR_SCHEMA.empty_table())
        self.planner = BatchPlanner(data, cfg.data, world_size=world, rank=self.rank, seed=cfg.seed)
        self.per_epoch, self.total = total_steps(self.planner, cfg)
        torch.manual_seed(cfg.seed)  # identical initial adapters on every rank
        self.bundle = build_bi_encoder(cfg, device, self.precision)
        self.engine = make_engine(self.bundle.module, cfg, self.total, device, world, self.precision)
        self.fp = fingerprint(cfg, world, self.bundle.info, data_info(self.planner, data))
        self.mlog = MetricsLog(self.args.run_uri, cfg.storage)
        self.loss_fn = RIInfoNCELoss(cfg.loss)
        self.ctx = DistContext.current()

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if there is one (its fingerprint must match this run's)."""
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            folder = _restored_folder(stack, self.session, self.args.run_uri, self.args.resume_from, cfg.storage)
            if folder is not None:
                self._load(folder)
        state = self.state
        torch.manual_seed(cfg.seed + 1009 * self.rank + 7919 * state.global_step)  # dropout: per rank and resume
        if self.rank == 0:
            self.mlog.event("resume" if self.resumed else "start", step=state.global_step, attempt=state.attempt,
                            world_size=self.session.world_size, strategy=cfg.strategy, total_steps=self.total,
                            time=time.time())
            log.info("%s at optimizer step %d of %d (%d per epoch, world size %d, %s, %s)",
                     "resuming" if self.resumed else "starting", state.global_step, self.total, self.per_epoch,
                     self.session.world_size, cfg.strategy, self.precision)
        self.stats = StepStats()  # the first step's clock starts now, after start-up

    def _load(self, folder: Path) -> None:
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {STATE_FILE}: not written by reasonembed train")
        saved = SavedState.from_json((folder / STATE_FILE).read_text(), str(folder))
        check_compatible(saved.fingerprint, self.fp, where=str(folder))
        self.engine.load(folder)
        self.state = saved.state
        self.state.attempt += 1
        if self.rank == 0:
            self.mlog.load_checkpoint(folder)
        self.resumed = True

    def train_epoch(self) -> None:
        """The current epoch's remaining global batches, until the epoch ends or the run reaches its last step."""
        state, accum = self.state, self.cfg.optim.gradient_accumulation_steps
        for batch in self.planner.iter_epoch(state.epoch, start_step=state.micro_step):
            if state.micro_step >= self.per_epoch * accum:
                break  # a remainder smaller than one accumulation group is left out of the epoch
            self._micro_step(batch)
            lr = self.engine.lr()
            stepped, grad_norm = self.engine.step()
            state.micro_step += 1
            if stepped:
                self._end_step(lr, grad_norm)
                if self.done:
                    break
        if not self.done:  # the epoch ran out (or only a partial accumulation group is left)
            state.epoch, state.micro_step = state.epoch + 1, 0

    def finish(self) -> dict[str, Any]:
        """Rank 0 flushes the step log and exports the model; returns rank-local figures."""
        state = self.state
        if self.rank == 0:
            self.mlog.flush()
            if self.cfg.export.enabled:
                self._export()
            self.mlog.event("finish", step=state.global_step, attempt=state.attempt, samples=state.samples,
                            wall_s=state.wall_s, time=time.time())
        return {"rank": self.rank, "state": state, "resumed": self.resumed, "model": self.bundle.info}

    def _micro_step(self, batch: LocalBatch) -> None:
        """Forward, loss and backward of this rank's share of one global batch; its figures go to ``stats``."""
        emb, step, fmt = self.bundle.embedder, self.state.global_step, self.cfg.embedder.query_format
        q_ids, q_cut = emb.token_ids_with_flags(format_queries(batch.queries, batch.prompts, fmt))
        p_ids, p_cut = emb.token_ids_with_flags(batch.passages)
        rq_in = None
        if self.loss_fn.needs_reasoning(step):
            # Rows without a reasoning query are masked out of RI (weight as in basic InfoNCE); embed their query
            # in its place so every rank runs the same shapes.
            rq = [r if ok else q for r, q, ok in zip(batch.reasoning_queries, batch.queries, batch.has_reasoning,
                                                      strict=True)]
            rq_in = emb.pad(emb.token_ids(format_queries(rq, batch.prompts, fmt))[0])
        rows = self.cfg.passage_chunk_rows
        chunks, inverse = passage_chunks(p_ids, len(q_ids) if rows is None else rows)
        engine = self.engine
        with engine.micro_context():
            with engine.autocast():
                q_emb, p_emb = engine.forward(emb.pad(q_ids), [emb.pad([p_ids[i] for i in c]) for c in chunks])
                p_emb = p_emb[torch.as_tensor(inverse, device=p_emb.device)]  # back to planner order (keeps grads)
                rq_emb = self.bundle.module.encode_frozen(rq_in) if rq_in is not None else None
                out = self.loss_fn(q_emb, p_emb, rq_emb, has_reasoning=batch.has_reasoning, step=step)
            engine.backward(out.loss)
        counts = all_reduce_sum(torch.tensor([sum(map(len, q_ids)) + sum(map(len, p_ids)), sum(q_cut) + sum(p_cut),
                                              len(p_ids), batch.n_repeated_groups], dtype=torch.float64), self.ctx)
        self.stats.add(out, counts, batch.domain)

    def _end_step(self, lr: float, grad_norm: float | None) -> None:
        """Book a finished optimizer step: state, step log, (test) fault, report and checkpoint; a fresh ``stats``."""
        state = self.state
        dt = time.time() - self.stats.started
        state.global_step += 1
        state.samples += self.stats.queries
        state.wall_s += dt
        row = self.stats.row(state, lr, grad_norm, dt)
        if self.rank == 0:
            self.mlog.append(row)
        faults.maybe_kill(self.args.fault, state.global_step, self.rank)
        self._report(row)
        self.stats = StepStats()  # checkpoint and logging time is not step time

    def _report(self, row: dict[str, Any]) -> None:
        """Report metrics (and a checkpoint when due) to the session: every rank calls report the same times."""
        step, cfg = self.state.global_step, self.cfg
        ckpt_due = step % cfg.checkpointing.every_n_steps == 0 or step == self.total
        if self.rank == 0 and (ckpt_due or step % cfg.log.flush_every_n_steps == 0):
            self.mlog.flush()
        if not (ckpt_due or step % cfg.log.every_n_steps == 0):
            return
        metrics = {k: v for k, v in row.items() if v is not None}
        if self.rank == 0:
            log.info("step %d/%d  loss %.4f  unweighted %.4f  RI mean %s  lr %.2e  %.1f samples/s", step, self.total,
                     row["loss"], row["loss_unweighted"], "-" if row["ri_mean"] is None else f"{row['ri_mean']:.3f}",
                     row["lr"], row["samples_per_s"] or 0.0)
        if ckpt_due:
            self._checkpoint(metrics)
        else:
            self.session.report(metrics, None, checkpoint_name(step))

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank writes its part and reports it; rank 0 then names it the run's newest complete checkpoint."""
        step, rank = self.state.global_step, self.rank
        with tempfile.TemporaryDirectory(prefix="reasonembed-ckpt-") as tmp:
            folder = Path(tmp)
            self.engine.save(folder, rank)
            if rank == 0:
                extra = {"config": self.cfg.model_dump(mode="json"), "model": self.bundle.info}
                (folder / STATE_FILE).write_text(SavedState(self.state, self.fp, extra).to_json())
                self.mlog.save_checkpoint(folder)
            has_files = any(folder.iterdir())
            self.session.report(metrics, folder if has_files else None, checkpoint_name(step))
        # report() returns once this rank's files are uploaded; after the barrier every rank's are, and the
        # checkpoint can be named as the run's newest complete one.
        if self.session.world_size > 1:
            torch.distributed.barrier()
        if rank == 0:
            uri = self.session.checkpoint_uri(self.args.ray_uri, checkpoint_name(step))
            write_pointer(self.args.run_uri, uri, step, self.cfg.storage)

    def _export(self) -> None:
        from reasonembed.models.lora import is_peft, merged
        from reasonembed.redapter.export import SentenceFormat, export_model

        cfg, bundle, emb = self.cfg, self.bundle, self.bundle.embedder
        backbone = emb.model
        adapter_dir = None
        if is_peft(backbone) and not cfg.export.merge_lora:
            adapter_dir = Path(tempfile.mkdtemp(prefix="reasonembed-adapter-"))
            backbone.save_pretrained(adapter_dir)  # before merging: merge_and_unload removes the adapters
        plain = merged(backbone).eval()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.export.dtype)
        if cfg.export.dtype == "auto":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        info = {"base_model": bundle.info["ref"], "base_model_name": bundle.info["name"], "run_id": cfg.run_id,
                "step": self.state.global_step, "lora": bundle.info["lora"],
                "query_format": cfg.embedder.query_format, "query_instruction": self.args.instruction}
        fmt = SentenceFormat(pooling=emb.pooling, normalize=emb.cfg.normalize, max_length=emb.max_length,
                             append_eos=emb.append_eos, prompts=self.args.prompts)
        export_model(plain.to(dtype), emb.tokenizer, self.args.export_uri, fmt, info=info, adapter=adapter_dir,
                     storage=cfg.storage)
        if adapter_dir is not None:
            shutil.rmtree(adapter_dir, ignore_errors=True)
        log.info("exported the model to %s", self.args.export_uri)


def _restored_folder(stack: contextlib.ExitStack, session, run_uri: str, resume_from: str | None,
                     storage: StorageConfig | None) -> Path | None:
    """The checkpoint this attempt starts from: the newest of Ray Train's own and the run's pointer.

    Why not Ray's alone: Ray Train registers a reported checkpoint when its controller polls the workers. A worker
    killed right after a report can take the poll result down with it, and the restarted group then gets no
    checkpoint (or an older one) from ``get_checkpoint()``, although every rank finished writing a newer one. The
    pointer (``latest_checkpoint.json``) is written after the barrier that follows every rank's upload, so it
    never names an incomplete checkpoint. ``resume_from`` (the driver's pick at submission) is the last resort.
    """
    from reasonembed.redapter.state import latest_checkpoint

    folder = stack.enter_context(session.restored())
    ray_step = -1
    if folder is not None and (folder / STATE_FILE).is_file():
        ray_step = SavedState.from_json((folder / STATE_FILE).read_text(), str(folder)).state.global_step
    found = latest_checkpoint(run_uri, storage)
    if found is not None and found[1].state.global_step > ray_step:
        if folder is not None:
            log.warning("Ray Train restored step %d, but every rank completed step %d: resuming from %s", ray_step,
                        found[1].state.global_step, found[0])
        return stack.enter_context(fetched(found[0], storage))
    if folder is None and resume_from:
        return stack.enter_context(fetched(resume_from, storage))
    return folder
