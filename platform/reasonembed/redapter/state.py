"""Where training stands (``TrainState``), what a checkpoint must match to be resumed (``fingerprint``), and
finding the newest complete checkpoint of a run (``latest_checkpoint.json``).

A checkpoint folder holds the strategy's own files (``ddp_state.pt``, or DeepSpeed's ``ds/`` tag folder with one
optimizer partition per rank) plus ``train_state.json`` (this module) and ``metrics.jsonl`` (the step log up to
that step). Resuming from a checkpoint written under another recipe would silently change the recipe, so the
fingerprint of every setting that shapes the optimisation (model, adapters, loss, optimizer, data, strategy,
world size) must match; the error names each differing field. Settings that only extend or observe a run
(``optim.epochs``, ``optim.max_steps``, logging, checkpoint frequency, export, eval) may change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from reasonembed.config.base import StorageConfig
from reasonembed.storage import Location

STATE_FILE = "train_state.json"
POINTER = "latest_checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint-"


class CheckpointMismatchError(ValueError):
    """A checkpoint cannot be resumed under this config; the message lists the differing settings."""


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint.

    ``global_step`` counts finished optimizer steps; ``epoch`` and ``micro_step`` say where the batch schedule
    (``BatchPlanner``) continues: global batch ``micro_step`` of epoch ``epoch``.
    """

    global_step: int = 0
    epoch: int = 0
    micro_step: int = 0
    samples: int = 0  # queries trained on, over all ranks
    attempt: int = 1  # 1 + number of times training was resumed from a checkpoint
    wall_s: float = 0.0  # training seconds (excluding start-up) summed over attempts

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class SavedState:
    """Contents of ``train_state.json``."""

    state: TrainState
    fingerprint: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"state": asdict(self.state), "fingerprint": self.fingerprint, "extra": self.extra},
                          indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, where: str = "checkpoint") -> SavedState:
        try:
            d = json.loads(text)
            return cls(TrainState.from_dict(d["state"]), d["fingerprint"], d.get("extra", {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointMismatchError(f"{where}: {STATE_FILE} is not a reasonembed train state ({exc})") from exc


def fingerprint(cfg, world_size: int, model_info: dict[str, Any], data_info: dict[str, Any]) -> dict[str, Any]:
    """Every setting a resumed run must share with the checkpoint (flat, dotted keys)."""
    optim = cfg.optim.model_dump(mode="json", exclude={"epochs", "max_steps"})
    fp: dict[str, Any] = {
        "model.name": model_info["name"],
        "model.kind": model_info["kind"],
        "model.hidden_size": model_info["hidden_size"],
        "model.trainable_params": model_info["trainable_params"],
        "embedder.pooling": model_info["pooling"],
        "embedder.max_length": model_info["max_length"],
        "embedder.query_format": cfg.embedder.query_format,
        "lora.enabled": model_info["lora"],
        "strategy": cfg.strategy,
        "zero_stage": cfg.zero_stage if cfg.strategy == "deepspeed" else None,
        "precision": model_info["precision"],
        "world_size": world_size,
        "seed": cfg.seed,
    }
    if model_info["lora"]:
        fp.update({f"lora.{k}": v for k, v in cfg.lora.model_dump(mode="json", exclude={"enabled"}).items()})
    fp.update({f"loss.{k}": v for k, v in cfg.loss.model_dump(mode="json").items()})
    fp.update({f"optim.{k}": v for k, v in optim.items()})
    fp.update({f"data.{k}": v for k, v in data_info.items()})
    return fp


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise ``CheckpointMismatchError`` naming every differing setting."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k, '<absent>')!r} != config {current.get(k, '<absent>')!r}"
             for k in keys if _norm(saved.get(k)) != _norm(current.get(k))]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it was written under a different recipe, and resuming would silently "
            "change it:\n  " + "\n  ".join(diffs)
            + "\nStart a new run (another run_id or checkpointing.storage_path), or restore these settings."
        )


def _norm(v: Any) -> Any:
    # JSON round trips turn tuples into lists.
    return json.loads(json.dumps(v, default=str))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def write_pointer(train_uri: str, checkpoint_uri: str, step: int, storage: StorageConfig | None = None) -> None:
    """Record ``checkpoint_uri`` as the newest checkpoint whose files every rank has finished writing."""
    Location(train_uri, storage).write_json(POINTER, {"uri": checkpoint_uri, "step": step})


def latest_checkpoint(train_uri: str, storage: StorageConfig | None = None) -> tuple[str, SavedState] | None:
    """The newest complete checkpoint of a run (from ``latest_checkpoint.json``), or None.

    Why a pointer of our own: Ray Train's ``get_checkpoint()`` only knows checkpoints its controller registered
    and snapshotted; a job killed right after a checkpoint upload can leave a complete checkpoint that Ray's
    snapshot does not list. The workers write the pointer after a barrier that follows every rank's upload, so it
    never names a checkpoint with a missing rank's files.
    """
    loc = Location(train_uri, storage)
    if not loc.exists(POINTER):
        return None
    uri = loc.read_json(POINTER)["uri"]
    ckpt = Location(uri, storage)
    if not ckpt.exists(STATE_FILE):
        raise CheckpointMismatchError(f"{loc.child(POINTER)} names {uri}, which has no {STATE_FILE}; the checkpoint "
                                      "was deleted or moved. Remove the pointer file to start the run over.")
    return uri, SavedState.from_json(ckpt.read_bytes(STATE_FILE).decode(), uri)
