"""Collectives for cross-device negatives: a gather that keeps gradients, and small gathers/sums for statistics.

Why a custom autograd gather. The loss on rank r uses its own B queries against the W·B·G passages of all ranks.
``dist.all_gather`` returns tensors without history; substituting the local tensor into the gathered list (the
classic trick) keeps the gradient that rank r's queries send to rank r's passages, but silently drops the gradient
that the queries of every *other* rank send to them as negatives. The model then trains on a loss that differs from
the global one, and nothing crashes. ``all_gather_with_grad`` fixes that: its backward all-reduces (sums) the
gradient of the gathered matrix, so rank s receives Σ_r ∂loss_r/∂p_s for its own passages. (``all_reduce`` is
supported by every backend, gloo included; ``torch.distributed.nn.functional.all_gather`` does the same through
all-to-all but is deprecated.) The test ``tests/test_loss.py`` checks loss and gradients against one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and process group of the data-parallel job (world_size 1: no collectives at all)."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None

    @staticmethod
    def single() -> DistContext:
        return DistContext()

    @staticmethod
    def current(group: object | None = None) -> DistContext:
        """The initialised default (or given) process group, else a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return DistContext()
        return DistContext(dist.get_rank(group), dist.get_world_size(group), group)

    def check_equal_shapes(self, n_queries: int, n_passages: int, device: torch.device) -> None:
        """Every rank must hold the same number of queries and passages: the label offset rank·(B·G) and the
        equal-size gather both rely on it. A mismatch raises on every rank instead of producing wrong labels."""
        mine = torch.tensor([n_queries, n_passages], dtype=torch.long, device=device)
        sizes = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(sizes, mine, group=self.group)
        seen = [tuple(int(v) for v in s.tolist()) for s in sizes]
        if len(set(seen)) != 1:
            raise ValueError(
                "cross-device loss needs the same (queries, passages) on every rank, got "
                + ", ".join(f"rank {r}: {s}" for r, s in enumerate(seen))
                + "; build each global batch with world_size × per-device batch rows (redapter.batching)"
            )


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor in rank order. Backward: sum the incoming gradient over ranks and
    return this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int, group: object | None):
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor, group=group)
        ctx.rank, ctx.rows, ctx.group = rank, tensor.size(0), group
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None, None, None


def all_gather_with_grad(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """[W·n, ...] concatenation of all ranks' [n, ...] tensors; gradients flow back to every rank's own rows."""
    if ctx.world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, ctx.rank, ctx.world_size, ctx.group)


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenation over ranks along dim 0 without gradients (statistics only)."""
    if ctx.world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor, group=ctx.group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left untouched)."""
    out = tensor.detach().clone()
    if ctx.world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
    return out
