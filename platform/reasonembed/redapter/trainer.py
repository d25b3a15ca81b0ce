"""`reasonembed train` / jobs/train.py: Redapter fine-tuning as a Ray Train job (library entry ``run(cfg)``).

The driver reads and validates the training samples once (bad rows to ``train/errors/``), checks that an existing
checkpoint of the run was written under the same recipe, puts the samples in the object store, and starts a
``TorchTrainer`` whose workers run ``redapter.worker.run_worker`` (DDP or DeepSpeed; RI-InfoNCE with cross-device
negatives). Checkpoints go through ``ray.train.report`` to ``RunConfig(storage_path=...)`` (local or s3://) with
``FailureConfig(max_failures)``: a worker that dies restarts the worker group from the latest checkpoint, and a job
submitted again with the same run resumes from it too. Rank 0 exports the final model for sentence-transformers.

Layout under ``<out>/<run_id>/`` (defaults)::

    train/               metrics.jsonl, metrics.csv, events.jsonl, curves.png, _manifest.json, errors/,
                         latest_checkpoint.json (newest checkpoint every rank finished writing)
    train/ray/           Ray Train's run folder: checkpoint-<step>/ (train_state.json, metrics.jsonl,
                         ddp_state.pt | ds/ with one ZeRO optimizer partition per rank)
    model/               the exported model (SentenceTransformer(path) loads it)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from reasonembed import progress
from reasonembed.config.base import ConfigError, StorageConfig, config_hash
from reasonembed.config.train import TrainJobConfig
from reasonembed.models.registry import BUILTINS
from reasonembed.redapter.batching import BatchPlanner
from reasonembed.redapter.curves import CURVES_PNG, METRICS_JSONL, plot_curves, read_events, read_rows
from reasonembed.redapter.data import TrainingData, read_training_data
from reasonembed.redapter.export import st_prompts
from reasonembed.redapter.state import CheckpointMismatchError, SavedState, check_compatible, fingerprint
from reasonembed.redapter.worker import WorkerArgs, data_info, total_steps
from reasonembed.storage import Location, StageDir, is_s3, join

log = logging.getLogger(__name__)

# Environment the workers need that a locally started raylet may not have (it inherits the environment of
# whoever started Ray, not of this driver).
_PROPAGATE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "REASONEMBED_CACHE", "REASONEMBED_DATA_DIR",
              "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


class TrainJobError(RuntimeError):
    """Training failed after its allowed restarts; the message says where the latest checkpoint is."""


def locations(cfg: TrainJobConfig) -> dict[str, str]:
    """Where the run writes: train folder (logs), Ray Train run folder (checkpoints), exported model."""
    train = cfg.checkpointing.storage_path or join(cfg.out, cfg.run_id, "train")
    if not is_s3(train):
        train = str(Path(train).expanduser().resolve())
    export = cfg.export.path or join(cfg.out, cfg.run_id, "model")
    if not is_s3(export):
        export = str(Path(export).expanduser().resolve())
    return {"train": train, "ray": join(train, cfg.checkpointing.name), "model": export}


def _absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Local data paths and a local model folder made absolute: Ray workers do not share the driver's working
    directory, so ``embedder.model=runs/base-model`` would name nothing there."""
    paths = [p if is_s3(p) else str(Path(p).expanduser().resolve()) for p in cfg.data.paths]
    update: dict[str, Any] = {"data": cfg.data.model_copy(update={"paths": paths})}
    model = Path(cfg.embedder.model).expanduser()
    if cfg.embedder.model not in BUILTINS and not model.is_absolute() and model.is_dir():
        update["embedder"] = cfg.embedder.model_copy(update={"model": str(model.resolve())})
    return cfg.model_copy(update=update)


def export_prompts(cfg: TrainJobConfig, data: TrainingData) -> tuple[str | None, dict[str, str]]:
    """(query instruction, sentence-transformers prompts): 'query' = the configured or most frequent training
    prompt, plus one prompt per domain (its most frequent one)."""
    prompts = data.table["prompt"].to_pylist()
    domains = data.table["domain"].to_pylist()
    per_domain = {}
    for d in sorted(set(domains)):
        per_domain[d] = Counter(p for p, dd in zip(prompts, domains, strict=True) if dd == d).most_common(1)[0][0]
    instruction = cfg.export.query_instruction
    if instruction is None:
        top = Counter(prompts).most_common(2)
        instruction = top[0][0] or None
        if len(top) > 1:
            log.warning("training prompts differ across samples; the exported 'query' prompt uses the most frequent "
                        "one (%r); each domain's prompt is stored under its domain name", instruction)
    return instruction, st_prompts(cfg.embedder.query_format, instruction, per_domain)


def static_model_info(cfg: TrainJobConfig) -> dict[str, Any]:
    """The model facts of the fingerprint that need no weights (the workers check the rest)."""
    import json

    from reasonembed.models.registry import resolve_model
    from reasonembed.redapter.model import backbone_type

    resolved = resolve_model(cfg.embedder.model)
    _, kind = backbone_type(cfg.embedder.model)
    hf = json.loads((resolved.path / "config.json").read_text())
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cfg.scaling.use_gpu else "fp32")
    return {"name": resolved.name, "kind": kind, "hidden_size": hf.get("hidden_size"),
            "trainable_params": None, "pooling": cfg.embedder.pooling or resolved.pooling,
            "max_length": cfg.embedder.max_length or resolved.max_length,
            "lora": cfg.lora.enabled if cfg.lora.enabled is not None else kind == "decoder", "precision": precision}


def preflight_resume(cfg: TrainJobConfig, where: dict[str, str], planner: BatchPlanner,
                     data: TrainingData) -> tuple[str | None, int]:
    """(checkpoint, step) this run resumes from ((None, 0): a fresh start); an incompatible checkpoint is an error
    here, before any worker starts."""
    from reasonembed.redapter.state import latest_checkpoint

    found = latest_checkpoint(where["train"], cfg.storage)
    if found is None and cfg.checkpointing.resume_from:
        loc = Location(cfg.checkpointing.resume_from, cfg.storage)
        if not loc.exists("train_state.json"):
            raise CheckpointMismatchError(f"checkpointing.resume_from: {loc.uri} has no train_state.json")
        found = (loc.uri, SavedState.from_json(loc.read_bytes("train_state.json").decode(), loc.uri))
    if found is None:
        return None, 0
    uri, saved = found
    current = fingerprint(cfg, cfg.scaling.num_workers, static_model_info(cfg), data_info(planner, data))
    current = {k: v for k, v in current.items() if v is not None}
    check_compatible({k: saved.fingerprint.get(k) for k in current}, current, where=uri)
    log.info("resuming from %s (optimizer step %d)", uri, saved.state.global_step)
    return uri, saved.state.global_step


def _ray_storage(uri: str, storage: StorageConfig | None):
    """(storage_path, storage_filesystem) for RunConfig. S3 gets an explicit filesystem (endpoint and, when they
    are in this environment, credentials), because Ray's controller and workers may not share our environment."""
    if not is_s3(uri):
        return uri, None
    import pyarrow.fs as pafs

    from reasonembed.storage import s3_filesystem

    fs = s3_filesystem(storage)
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        endpoint = (storage.s3_endpoint if storage else None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"access_key": os.environ["AWS_ACCESS_KEY_ID"],
                                  "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                                  "session_token": os.environ.get("AWS_SESSION_TOKEN"),
                                  "region": (storage.s3_region if storage else None)
                                  or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "http")
        fs = pafs.S3FileSystem(**kwargs)
    return uri[len("s3://"):], fs


def _worker_env(cfg: TrainJobConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PROPAGATE if os.environ.get(k)}
    if cfg.strategy == "deepspeed" and not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU: gloo process group, torch AdamW (docs/operations.md, "Ray Train, DeepSpeed and peft on CPU")
    return env


def run(cfg: TrainJobConfig) -> dict[str, Any]:
    """Train, checkpoint, export and (optionally) evaluate; returns a summary dict (also in the manifest)."""
    from reasonembed.runtime import apply_env_defaults, connect_ray

    t0 = time.time()
    apply_env_defaults()
    cfg = _absolute_paths(cfg)
    where = locations(cfg)
    data = read_training_data(cfg.data, cfg.storage, seed=cfg.seed)
    stage = StageDir(where["train"], "train", cfg.storage)
    if data.errors.num_rows:
        stage.write_errors(data.errors, 0)
    planner = BatchPlanner(data, cfg.data, world_size=cfg.scaling.num_workers, rank=0, seed=cfg.seed)
    per_epoch, total = total_steps(planner, cfg)
    resume_uri, start_step = preflight_resume(cfg, where, planner, data)

    ray = connect_ray(cfg.ray)
    trainer = _torch_trainer(cfg, where, _worker_args(cfg, where, data, ray.put(data.table), resume_uri))
    log.info("training %s on %d worker(s) (%s): %d optimizer steps (%d per epoch), from step %d",
             cfg.embedder.model, cfg.scaling.num_workers, cfg.strategy, total, per_epoch, start_step)
    try:
        with _follow_steps(where["train"], cfg.storage, total, start_step):
            result = trainer.fit()
    except Exception as exc:  # Ray Train wraps worker errors in TrainingFailedError subclasses
        from reasonembed.redapter.state import latest_checkpoint

        found = latest_checkpoint(where["train"], cfg.storage)
        hint = (f"the latest checkpoint is {found[0]} (step {found[1].state.global_step}); submitting the same job "
                "again resumes from it") if found else "no checkpoint was written"
        raise TrainJobError(f"training failed after max_failures={cfg.max_failures} restarts: {exc}\n{hint}") from exc
    return _finish(cfg, where, data, result, t0, total, stage)


def _worker_resources(cfg: TrainJobConfig) -> dict[str, float] | None:
    sc = cfg.scaling
    return sc.resources_per_worker or ({"CPU": 1} if not sc.use_gpu else None)


def _worker_args(cfg: TrainJobConfig, where: dict[str, str], data: TrainingData, table,
                 resume_uri: str | None) -> WorkerArgs:
    """What every worker gets; ``table`` is the samples table's ObjectRef (read once per worker)."""
    from reasonembed.redapter import faults

    instruction, prompts = export_prompts(cfg, data)
    return WorkerArgs(
        job=cfg, table=table, run_uri=where["train"], ray_uri=where["ray"], export_uri=where["model"],
        prompts=prompts, instruction=instruction, threads=int((_worker_resources(cfg) or {}).get("CPU", 1)),
        # Used when Ray Train has no checkpoint of its own for this run (see state.latest_checkpoint).
        resume_from=resume_uri, fault=faults.fault_from_env(),
    )


def _torch_trainer(cfg: TrainJobConfig, where: dict[str, str], args: WorkerArgs):
    """Ray Train's ``TorchTrainer``: the workers, where checkpoints go, how many restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from reasonembed.redapter.worker import train_loop_per_worker

    sc = cfg.scaling
    storage_path, storage_fs = _ray_storage(where["train"], cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker_args": args},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=_worker_resources(cfg),
                                     accelerator_type=sc.accelerator_type, placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=cfg.checkpointing.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpointing.num_to_keep),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
        ),
    )


@contextlib.contextmanager
def _follow_steps(train_uri: str, storage: StorageConfig | None, total: int, start_step: int):
    """A progress line of optimizer steps while ``trainer.fit()`` blocks the driver.

    The steps come back through the step log that rank 0 flushes (``metrics.jsonl``, every ``log.flush_every_n_steps``
    steps and at checkpoints), polled by a daemon thread: Ray Train's own callbacks run in its controller actor,
    not in this process. Steps resumed from a checkpoint are not counted, so rate and ETA are this attempt's.
    """
    if not progress.enabled():
        yield
        return
    poll_s = 15.0 if is_s3(train_uri) else 3.0
    stop = threading.Event()
    with progress.step("train", total=max(0, total - start_step), unit="steps") as bar:
        if start_step:
            bar.set_postfix(f"resumed at step {start_step}")

        def read() -> None:
            try:
                rows = read_rows(train_uri, storage)
                if rows:
                    bar.set(max(0, min(total, int(rows[-1]["step"]) + 1) - start_step))
            except Exception as exc:  # a half-written file or a storage hiccup: next poll
                log.debug("step log not readable yet: %s", exc)

        def poll() -> None:
            while not stop.wait(poll_s):
                read()

        thread = threading.Thread(target=poll, name="reasonembed-train-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=poll_s + 5)
            read()  # rank 0 flushes the step log when training ends


def _finish(cfg: TrainJobConfig, where: dict[str, str], data: TrainingData, result, t0: float, total: int,
            stage: StageDir) -> dict[str, Any]:
    rows = read_rows(where["train"], cfg.storage)
    events = [e for e in read_events(where["train"], cfg.storage) if e.get("time", 0) >= t0 - 1]
    plot_uri = None
    if cfg.log.plot and rows:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(rows, Path(tmp, CURVES_PNG), title=f"{cfg.run_id}: {cfg.embedder.model}")
            Location(where["train"], cfg.storage).upload_file(png, CURVES_PNG)
        plot_uri = join(where["train"], CURVES_PNG)
    train_s = sum(r.get("step_time_s") or 0.0 for r in rows)
    samples = sum(r.get("queries") or 0 for r in rows)
    summary: dict[str, Any] = {
        "run_id": cfg.run_id,
        "model": cfg.embedder.model,
        "strategy": cfg.strategy,
        "world_size": cfg.scaling.num_workers,
        "steps": rows[-1]["step"] + 1 if rows else 0,
        "total_steps": total,
        "samples": samples,
        "train_s": round(train_s, 3),
        "samples_per_s": round(samples / train_s, 3) if train_s else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "resumed_from_steps": [e["step"] for e in events if e["event"] == "resume"],
        "attempts": max((e.get("attempt", 1) for e in events), default=1),
        # Ray reports the path inside its filesystem (no s3:// scheme): name it under the run folder instead.
        "checkpoint": join(where["ray"], Path(result.checkpoint.path).name) if result.checkpoint else None,
        "train_dir": where["train"],
        "metrics_log": join(where["train"], METRICS_JSONL),
        "plot": plot_uri,
        "model_path": where["model"] if cfg.export.enabled else None,
        "data": data.summary(),
        "wall_s": None,
    }
    if cfg.eval.data and cfg.export.enabled:
        summary["eval"] = _dev_eval(cfg, where["model"])
    summary["wall_s"] = round(time.time() - t0, 3)
    stage.write_manifest(
        config_hash=config_hash(cfg, exclude={"ray", "scaling", "log", "export", "eval", "max_failures"}),
        rows_in=data.n_read, rows_out=data.n_samples, rows_error=data.errors.num_rows,
        errors_by_reason=data.summary()["errors_by_reason"], wall_s=summary["wall_s"], extra=summary,
    )
    log.info("training done: %d steps, %.1f samples/s, final loss %s; model at %s", summary["steps"],
             summary["samples_per_s"] or 0.0, summary["final_loss"], summary["model_path"])
    return summary


def _dev_eval(cfg: TrainJobConfig, model_uri: str) -> dict[str, Any]:
    """Evaluate the exported (and optionally the base) model on the dev set in a Ray task (a GPU one with GPUs)."""
    import ray

    from reasonembed.redapter.dev_eval import evaluate_model

    ev = cfg.eval
    if not Path(ev.data).expanduser().is_dir():
        raise ConfigError(f"eval.data: {ev.data} is not a folder (BEIR layout expected)")
    task = ray.remote(num_gpus=1 if cfg.scaling.use_gpu else 0, num_cpus=1)(evaluate_model)
    dev = ev.model_copy(update={"data": str(Path(ev.data).expanduser().resolve())})
    kwargs = {"storage": cfg.storage, "max_length": cfg.embedder.max_length}
    out = {"trained": ray.get(task.remote(model_uri, dev, **kwargs))}
    if ev.compare_base:
        base_instr = ev.instruction if ev.instruction is not None else _prompt_instruction(model_uri, cfg)
        out["base"] = ray.get(task.remote(cfg.embedder.model, dev.model_copy(update={"instruction": base_instr}),
                                          **kwargs))
    return out


def _prompt_instruction(model_uri: str, cfg: TrainJobConfig) -> str | None:
    info = Location(model_uri, cfg.storage).read_json("reasonembed.json")
    return info.get("query_instruction") or None
