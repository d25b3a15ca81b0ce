"""RI-InfoNCE: InfoNCE re-weighted per query by its reasoning intensity (Redapter, ReasonEmbed arXiv 2510.08252).

The trainer encodes; this module only turns embeddings into a loss. Cross-device gathering lives in
``reasonembed.redapter.gather`` so that the collectives (the classic place for silent bugs) can be read on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from reasonembed.config.base import StrictModel
from reasonembed.redapter.gather import DistContext, all_gather_cat, all_gather_with_grad, all_reduce_sum


class LossConfig(StrictModel):
    """Settings of the Redapter loss (docs/algorithm.md, section 2)."""

    temperature: float = Field(0.02, gt=0, description="Softmax temperature τ: s(q,d) = <e_q, e_d> / τ. Paper: 0.02.")
    kappa: float = Field(
        5.0, gt=0, description="Upper clamp κ of the reasoning intensity before L1 normalisation. Paper: 5."
    )
    ri_start_step: int = Field(
        100, ge=0, description="Optimizer steps (0-based) run with plain mean InfoNCE before RI weights switch on. "
        "Paper: 100."
    )
    eps: float = Field(1e-6, gt=0, description="ε in RI_i = L_i(q) / (L_i(q') + ε). Paper: 1e-6.")
    use_ri: bool = Field(
        True, description="Weight per-query losses by reasoning intensity (RI-InfoNCE). False: basic InfoNCE."
    )
    cross_device: bool = Field(
        True, description="Gather passages from all data-parallel ranks so each query's softmax runs over the "
        "global batch (1 positive + every other passage). False: only this rank's passages are negatives."
    )


@dataclass
class LossOutput:
    """What one loss call returns. Tensors are this rank's rows; floats are global (over all ranks)."""

    loss: torch.Tensor  # the tensor to backward (see the DDP note in RIInfoNCELoss.forward)
    value: float  # global loss L = Σ_i w_i L_i over the global batch (what a single process would report)
    unweighted_loss: float  # global mean InfoNCE, mean_i L_i
    per_sample: torch.Tensor  # this rank's L_i(q), detached, [B]
    weights: torch.Tensor  # this rank's w_i (normalised over the global batch), detached, [B]
    ri: torch.Tensor | None  # this rank's RI_i (1.0 for rows without a reasoning query), detached, [B]
    ri_active: bool  # True when the weights came from RI (step >= ri_start_step and use_ri)
    n_queries: int  # global number of queries
    n_without_reasoning: int  # global number of rows trained with the basic InfoNCE weight (RI := 1)
    ri_stats: dict[str, float] = field(default_factory=dict)  # min/max/mean/median over rows WITH a reasoning query

    def log_dict(self) -> dict[str, float]:
        """Per-step figures for the trainer's log (docs/algorithm.md, section 2, "Logging")."""
        out = {
            "loss": self.value,
            "loss_unweighted": self.unweighted_loss,
            "ri_active": float(self.ri_active),
            "n_queries": float(self.n_queries),
            "n_without_reasoning": float(self.n_without_reasoning),
        }
        out.update({f"ri_{k}": v for k, v in self.ri_stats.items()})
        return out


def infonce_per_sample(
    q: torch.Tensor, p_all: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """L_i = -log softmax_j(<q_i, p_j>/τ)[label_i] for each query row (no reduction)."""
    scores = q @ p_all.transpose(0, 1) / temperature
    return F.cross_entropy(scores, labels, reduction="none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Scores reach ±1/τ = ±50, where bf16's 8-bit mantissa is off by ~0.2: score in float32 (a B x W·B·G matmul,
    # negligible next to the encoder). Gradients flow back through the cast in the model's dtype.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _Weighting(NamedTuple):
    """Steps (5) and (6) of :class:`RIInfoNCELoss`: the detached per-query weights and what is logged about them."""

    weights: torch.Tensor  # this rank's w_i, normalised over the global batch, [B]
    ri: torch.Tensor | None  # this rank's RI_i (1.0 for rows without a reasoning query), [B]
    ri_stats: dict[str, float]  # min/max/mean/median of RI over the global rows that have a reasoning query
    ri_active: bool  # True when the weights came from RI
    n_without_reasoning: int  # global count of rows without a reasoning query
    unweighted: float  # global mean_i L_i(q)


class RIInfoNCELoss(nn.Module):
    """Contrastive loss in which each query's InfoNCE term is weighted by its *reasoning intensity* (RI).

    A query whose plain form is much harder to match than its reasoning-augmented rewrite q′ needs reasoning to be
    retrieved; RI-InfoNCE spends more of the gradient on such queries. The loss is stated in docs/algorithm.md,
    section 2 ("Redapter: RI-InfoNCE"); docs/training.md describes how the trainer feeds it.

    The loss, over the N queries of the global batch (all data-parallel ranks)::

        s(q, d) = <e_q, e_d> / τ                           (e: L2-normalised embeddings)
        L_i     = −log softmax_i(positive)                 (softmax over s(q_i, d) for every passage d of the batch)
        RI_i    = L_i(q) / (L_i(q′) + ε)
        w_i     = clamp(RI_i, 0, κ) / Σ_j clamp(RI_j, 0, κ)   (detached; the sum runs over the global batch)
        L       = Σ_i w_i L_i(q)

    The first ``ri_start_step`` optimizer steps (and every step with ``use_ri=False``) use L = mean_i L_i(q).

    Algorithm, per training step (B queries on this rank, G passages per query, W data-parallel ranks); the steps
    are marked ``# Step (n)`` in the code:

    1. L2-normalise query embeddings e_q [B, D] and passage embeddings e_p [B·G, D]; passage rows are grouped per
       query as ``[pos_0, neg_0,1 … neg_0,G-1, pos_1, …]``.
    2. Gather the passages of all W ranks (``cross_device``), so each query scores all W·B·G passages:
       s(q, d) = <e_q, e_d> / τ. Query i on rank r has its positive at column ``r·B·G + i·G``.
    3. Per-sample InfoNCE L_i(q) = −log softmax_i(positive), with gradients.
    4. Under ``no_grad``, the same loss for the reasoning query q′ (embedded in eval mode, without dropout noise)
       against the *detached* passages: L_i(q′).
    5. RI_i = L_i(q) / (L_i(q′) + ε). Rows without a reasoning query get RI_i = 1 (they keep the basic InfoNCE
       weight when the rest of the batch is uniform) and are counted.
    6. w_i = clamp(RI_i, 0, κ) / Σ_j clamp(RI_j, 0, κ), the sum over the global batch; weights are detached.
       Before ``ri_start_step`` (or with ``use_ri=False``): w_i = 1/N.
    7. L = Σ_i w_i L_i(q); this rank backpropagates W · Σ_{i on this rank} w_i L_i(q) (DDP averages gradients).

    Args:
        config: a :class:`LossConfig`. Typical values (paper): ``temperature=0.02``, ``kappa=5``,
            ``ri_start_step=100``, ``eps=1e-6``, ``use_ri=True``, ``cross_device=True``.
        group: the process group for cross-device negatives (None: the default group).

    References:
        - ReasonEmbed: Enhanced Text Embeddings for Reasoning-Intensive Document Retrieval, arXiv 2510.08252
          (Redapter, RI-InfoNCE).
        - van den Oord et al., Representation Learning with Contrastive Predictive Coding, arXiv 1807.03748 (InfoNCE).

    Inputs:
        +------------------------------------+--------------------------------------------------------+
        | argument                           | shape / meaning                                        |
        +====================================+========================================================+
        | q_emb                              | [B, D] query embeddings (with grad)                    |
        | p_emb                              | [B·G, D] passage embeddings, 1 positive then G−1 negs  |
        | rq_emb                             | [B, D] reasoning-query embeddings (None: no RI)        |
        | has_reasoning                      | [B] bool, False where the row had no reasoning query   |
        | step                               | int, the 0-based optimizer step                        |
        +------------------------------------+--------------------------------------------------------+

    Relations:
        - With uniform RI (every RI_i equal, e.g. no row has a reasoning query) the weights are 1/N and the loss is
          basic InfoNCE: sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1/τ`` and cosine
          similarity on (anchor, positive, negative_1, …, negative_G−1) tuples, with ``gather_across_devices=True``
          for ``cross_device`` (its candidates are the same passages in another order; the softmax does not care).
        - Before ``ri_start_step`` or with ``use_ri=False`` it is that loss too, whatever the reasoning queries say.

    Example (random embeddings; in training they come from the bi-encoder, ``rq`` from
    ``BiEncoder.encode_frozen`` when :meth:`needs_reasoning` says so)::

        >>> import torch
        >>> from reasonembed.redapter.loss import LossConfig, RIInfoNCELoss
        >>> gen = torch.Generator().manual_seed(0)
        >>> B, G, D = 4, 3, 8
        >>> q = torch.randn(B, D, generator=gen, requires_grad=True)      # queries, with grad
        >>> p = torch.randn(B * G, D, generator=gen, requires_grad=True)  # per query: positive, then G−1 negatives
        >>> rq = torch.randn(B, D, generator=gen)                         # reasoning queries, no grad
        >>> loss_fn = RIInfoNCELoss(LossConfig(ri_start_step=0))
        >>> loss_fn.needs_reasoning(step=0)
        True
        >>> out = loss_fn(q, p, rq, has_reasoning=[True, True, False, True], step=0)
        >>> out.loss.backward()
        >>> out.ri_active, out.n_queries, out.n_without_reasoning
        (True, 4, 1)
        >>> float(out.ri[2]), round(float(out.weights.sum()), 6)
        (1.0, 1.0)
        >>> round(out.value, 6) == round(float((out.weights * out.per_sample).sum()), 6)
        True
        >>> q.grad.shape, p.grad.shape
        (torch.Size([4, 8]), torch.Size([12, 8]))
    """

    def __init__(self, config: LossConfig | None = None, group: object | None = None):
        super().__init__()
        self.config = config or LossConfig()
        self.group = group

    def needs_reasoning(self, step: int) -> bool:
        """Whether this step uses RI weights, i.e. whether the caller should embed the reasoning queries."""
        return self.config.use_ri and step >= self.config.ri_start_step

    def forward(
        self,
        q_emb: torch.Tensor,
        p_emb: torch.Tensor,
        rq_emb: torch.Tensor | None = None,
        has_reasoning: torch.Tensor | list[bool] | None = None,
        step: int = 0,
    ) -> LossOutput:
        """One step's loss (the class docstring's steps). With cross-device negatives this runs collectives, so every
        rank must call it with the same ``step`` and the same (queries, passages) counts, and pass ``rq_emb`` on all
        ranks or on none."""
        cfg = self.config
        b = _check_shapes(q_emb, p_emb, rq_emb)
        g = p_emb.size(0) // b
        device = q_emb.device
        ctx = DistContext.current(self.group) if cfg.cross_device else DistContext.single()

        # Step (1): unit vectors (scored in float32, see _upcast).
        q = F.normalize(_upcast(q_emb), dim=-1)
        p = F.normalize(_upcast(p_emb), dim=-1)
        # Step (2): every rank's passages (ranks concatenated in rank order), so local query i's positive is at
        # global column rank·(B·G) + i·G.
        if ctx.world_size > 1:
            ctx.check_equal_shapes(b, p.size(0), device)
            p_all = all_gather_with_grad(p, ctx)
        else:
            p_all = p
        labels = ctx.rank * p.size(0) + torch.arange(b, device=device) * g
        # Step (3): L_i(q), with gradients.
        per_sample = infonce_per_sample(q, p_all, labels, cfg.temperature)  # [B]
        mask = _reasoning_mask(has_reasoning, b, device)
        # Step (4): L_i(q′) against the detached passages.
        per_sample_rq = None
        if rq_emb is not None:
            with torch.no_grad():
                rq = F.normalize(_upcast(rq_emb.detach()), dim=-1)
                per_sample_rq = infonce_per_sample(rq, p_all.detach(), labels, cfg.temperature)
        w = self._ri_weights(per_sample, per_sample_rq, mask, ctx, step)  # Steps (5) and (6)

        # Step (7): L = Σ_i w_i L_i(q).
        local = (w.weights * per_sample).sum()
        # DDP (and DeepSpeed's data parallelism) AVERAGE gradients over the W ranks: θ.grad = (1/W) Σ_r ∇_θ loss_r.
        # The global loss is L = Σ_r local_r with local_r = Σ_{i on rank r} w_i L_i (the weights are normalised
        # over the global batch). all_gather_with_grad's backward sums, over ranks, the gradient every rank's
        # queries send to each passage, so Σ_r ∇_θ local_r = ∇_θ L. Backpropagating W·local_r therefore makes the
        # averaged gradient exactly ∇_θ L, the gradient a single process would compute on the concatenated batch.
        # Without cross-device gathering each rank's loss is self-contained (weights normalised locally, ctx is
        # single) and DDP's average is the usual mean over ranks.
        loss = local * ctx.world_size
        value = float(all_reduce_sum(local.detach(), ctx))
        return LossOutput(loss=loss, value=value, unweighted_loss=w.unweighted, per_sample=per_sample.detach(),
                          weights=w.weights, ri=w.ri, ri_active=w.ri_active, n_queries=b * ctx.world_size,
                          n_without_reasoning=w.n_without_reasoning, ri_stats=w.ri_stats)

    def _ri_weights(self, per_sample: torch.Tensor, per_sample_rq: torch.Tensor | None, mask: torch.Tensor,
                    ctx: DistContext, step: int) -> _Weighting:
        """Steps (5) and (6): RI_i from L_i(q) and L_i(q′), then w_i = clamp(RI_i, 0, κ) / Σ_j clamp(RI_j, 0, κ)
        over the global batch, detached. ``per_sample_rq`` None (no reasoning queries this step), a step before
        ``ri_start_step`` or ``use_ri=False``: w_i = 1/N. Every rank runs the same collectives in the same order."""
        cfg = self.config
        n_global = per_sample.size(0) * ctx.world_size
        ri = None
        ri_stats: dict[str, float] = {}
        with torch.no_grad():
            if per_sample_rq is not None:
                # Step (5): RI_i = L_i(q) / (L_i(q′) + ε); rows without a reasoning query get RI_i = 1.
                ri = per_sample.detach() / (per_sample_rq + cfg.eps)
                ri = torch.where(mask, ri, torch.ones_like(ri))
                # One gather of [RI, has_reasoning] rows: the median needs every value, not just a sum.
                both = all_gather_cat(torch.stack([ri, mask.to(ri.dtype)], dim=1), ctx)
                ri_stats = _ri_stats(both[:, 0], both[:, 1] > 0.5)
            ri_active = cfg.use_ri and step >= cfg.ri_start_step and ri is not None
            # Step (6): clamp to [0, κ], then normalise by the sum over all ranks' queries (one all-reduce, which
            # also carries the counts that are logged).
            clamped = ri.clamp(min=0.0, max=cfg.kappa) if ri_active else torch.zeros_like(per_sample)
            sums = all_reduce_sum(
                torch.stack([clamped.sum(), (~mask).sum().to(clamped.dtype), per_sample.detach().sum()]), ctx
            )
            total = float(sums[0])
            # Every L_i is > 0 in floating point unless each positive wins by a huge margin; guard anyway so that a
            # degenerate batch trains with the basic weights instead of dividing by zero.
            if ri_active and total > 0:
                weights = clamped / total
            else:
                weights = torch.full_like(clamped, 1.0 / n_global)
        return _Weighting(weights=weights, ri=ri, ri_stats=ri_stats, ri_active=ri_active,
                          n_without_reasoning=int(round(float(sums[1]))), unweighted=float(sums[2]) / n_global)


def _reasoning_mask(has_reasoning: torch.Tensor | list[bool] | None, b: int, device: torch.device) -> torch.Tensor:
    """[B] bool: which rows have a reasoning query (None: every row). A property of the data, so it is counted
    even on steps that skip the reasoning forward pass."""
    if has_reasoning is None:
        return torch.ones(b, dtype=torch.bool, device=device)
    mask = torch.as_tensor(has_reasoning, dtype=torch.bool, device=device).reshape(-1)
    if mask.numel() != b:
        raise ValueError(f"has_reasoning has {mask.numel()} entries for {b} queries")
    return mask


def _check_shapes(q: torch.Tensor, p: torch.Tensor, rq: torch.Tensor | None) -> int:
    if q.dim() != 2 or p.dim() != 2:
        raise ValueError(f"q_emb and p_emb must be 2-D [rows, dim]; got {tuple(q.shape)} and {tuple(p.shape)}")
    b = q.size(0)
    if b == 0:
        raise ValueError("empty batch: q_emb has no rows")
    if p.size(1) != q.size(1):
        raise ValueError(f"embedding dims differ: q_emb {q.size(1)}, p_emb {p.size(1)}")
    if p.size(0) % b != 0 or p.size(0) == 0:
        raise ValueError(
            f"p_emb has {p.size(0)} rows for {b} queries: expected B·G rows (1 positive + G−1 negatives per query)"
        )
    if rq is not None and tuple(rq.shape) != tuple(q.shape):
        raise ValueError(f"rq_emb shape {tuple(rq.shape)} must equal q_emb shape {tuple(q.shape)}")
    return b


def _ri_stats(ri: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """min/max/mean/median of RI over the rows that had a reasoning query (NaN when none had)."""
    vals = ri[mask.bool()].float()
    if vals.numel() == 0:
        nan = math.nan
        return {"min": nan, "max": nan, "mean": nan, "median": nan}
    # torch.median returns the lower of the two middle values for an even count; report the usual midpoint.
    return {
        "min": float(vals.min()),
        "max": float(vals.max()),
        "mean": float(vals.mean()),
        "median": float(vals.quantile(0.5)),
    }
