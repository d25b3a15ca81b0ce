"""Data-parallel strategies behind one small interface: torch DDP (or a plain module with one worker) and
DeepSpeed ZeRO. Both use AdamW with the same LR schedule, clip gradients and save/load their own checkpoints.

LR schedule (HF ``get_linear_schedule_with_warmup``), for optimizer step s of T with W = ceil(warmup_ratio · T):
    lr(s) = lr · s / W                 for s < W
    lr(s) = lr · (T − s) / (T − W)     after warmup ("linear"; 1 for "constant")
Weight decay skips 1-D parameters (biases, norms), as HF's Trainer does.

Gradient accumulation: each accumulated global batch keeps its own loss (own softmax and RI weights); DDP divides
by the accumulation count and skips the gradient all-reduce (``no_sync``) until the last one, DeepSpeed does both
itself (``gradient_accumulation_steps``). The DeepSpeed optimizer is ``torch.optim.AdamW`` (``torch_adam`` inside
``optimizer.params``; at the top level DeepSpeed ignores it and JIT-compiles FusedAdam for minutes on CPU,
docs/training.md).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DDP_STATE = "ddp_state.pt"
DS_TAG = "ds"


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = math.ceil(warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return fn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}


class TorchEngine:
    """DDP over the default process group (gloo on CPU, nccl on GPU), or the bare module when world_size is 1."""

    name = "ddp"

    def __init__(self, module: nn.Module, cfg, total_steps: int, device: torch.device, world_size: int,
                 precision: str):
        self.module = module.to(device)
        self.accum = cfg.optim.gradient_accumulation_steps
        self.max_grad_norm = cfg.optim.max_grad_norm
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.wrapped: nn.Module = DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.wrapped = self.module
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.module, o.weight_decay), lr=o.lr, betas=o.betas,
                                           eps=o.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(total_steps, o.warmup_ratio, o.schedule))
        # Weights stay fp32 (or bf16 frozen base weights under LoRA); bf16 runs the forward under autocast.
        self._bf16 = precision == "bf16"
        self._device_type = device.type
        self._micro = 0

    def autocast(self):
        if self._bf16:
            return torch.autocast(self._device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_context(self):
        """Wraps forward AND backward of one global batch: skip DDP's gradient all-reduce until the last
        accumulated batch."""
        last = (self._micro + 1) % self.accum == 0
        if last or self.wrapped is self.module:
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def forward(self, queries, passages):
        return self.wrapped(queries, passages)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> tuple[bool, float | None]:
        """Count one global batch; at an accumulation boundary clip, step and return (True, grad norm)."""
        self._micro += 1
        if self._micro % self.accum:
            return False, None
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True, float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, rank: int) -> None:
        if rank == 0:  # DDP replicas are identical after every step
            torch.save({"model": trainable_state(self.module), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / DDP_STATE)

    def load(self, folder: Path) -> None:
        path = folder / DDP_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {DDP_STATE} (was it written by strategy=deepspeed?)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        expected = set(trainable_state(self.module))
        if set(state["model"]) != expected:
            missing, extra = sorted(expected - set(state["model"])), sorted(set(state["model"]) - expected)
            raise ValueError(f"{path}: trainable parameters differ from the model's (missing {missing[:5]}, "
                             f"unexpected {extra[:5]})")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 0-2 with bf16 (GPU) or fp32, over the process group Ray Train set up."""

    name = "deepspeed"

    def __init__(self, module: nn.Module, cfg, total_steps: int, device: torch.device, world_size: int,
                 precision: str):
        import deepspeed

        o = cfg.optim
        self.config = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: batches are built by BatchPlanner
            "gradient_accumulation_steps": o.gradient_accumulation_steps,
            "train_batch_size": world_size * o.gradient_accumulation_steps,
            "optimizer": {"type": "AdamW", "params": {
                "lr": o.lr, "betas": list(o.betas), "eps": o.adam_eps, "weight_decay": o.weight_decay,
                "torch_adam": True,
            }},
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": precision == "bf16"},
            "gradient_clipping": o.max_grad_norm or 0.0,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        fn = lr_lambda(total_steps, o.warmup_ratio, o.schedule)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module.to(device), model_parameters=param_groups(module, o.weight_decay), config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
        )
        self.module = self.engine.module

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module to bf16 itself

    def micro_context(self):
        return contextlib.nullcontext()  # DeepSpeed reduces gradients at the accumulation boundary itself

    def forward(self, queries, passages):
        return self.engine(queries, passages)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> tuple[bool, float | None]:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return False, None
        norm = self.engine.get_global_grad_norm()
        return True, None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, rank: int) -> None:
        # Every rank writes its ZeRO optimizer partition; frozen base weights (LoRA) are not duplicated.
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        if not (folder / DS_TAG).is_dir():
            raise FileNotFoundError(f"{folder} has no DeepSpeed tag folder {DS_TAG!r} (was it written by "
                                    "strategy=ddp?)")
        path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {folder}")


def make_engine(module: nn.Module, cfg, total_steps: int, device: torch.device, world_size: int, precision: str):
    if cfg.strategy == "deepspeed":
        if device.type == "cpu":
            # DeepSpeed picks its accelerator at import; the trainer also sets this in the workers' environment.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return DeepSpeedEngine(module, cfg, total_steps, device, world_size, precision)
    return TorchEngine(module, cfg, total_steps, device, world_size, precision)
