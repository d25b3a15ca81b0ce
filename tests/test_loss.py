"""RI-InfoNCE (reasonembed.redapter.loss): hand-computed values, weight properties, and cross-device exactness.

The cross-device test runs two real gloo processes on 127.0.0.1 with a DDP-wrapped encoder and checks that loss,
weights, RI statistics and the DDP-averaged gradients equal one process on the concatenated global batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reasonembed.config.base import ConfigError, load_model
from reasonembed.redapter.loss import LossConfig, LossOutput, RIInfoNCELoss


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def reference_infonce(q, p, group, tau=0.02):
    """Plain InfoNCE written out independently: full score matrix, log-softmax, positive at i*group."""
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    logp = torch.log_softmax(q @ p.T / tau, dim=1)
    return -logp[torch.arange(q.size(0)), torch.arange(q.size(0)) * group]


# -- hand-computed 2 queries x group 3 ------------------------------------------------------------------------------

# Passages of query 0: pos 0°, negs 90°, 180°; of query 1: pos 60°, negs 120°, 90°. Queries at 0° and 60°,
# reasoning queries at -30° and 30°. With τ = 0.5, s = 2·cos(angle between them).
P_DEG = [0, 90, 180, 60, 120, 90]


def hand_losses():
    e, r3 = math.exp, math.sqrt(3)
    # q0 = 0°: cosines 1, 0, -1, 1/2, -1/2, 0
    l0 = -math.log(e(2) / (e(2) + e(0) + e(-2) + e(1) + e(-1) + e(0)))
    # q1 = 60°: cosines 1/2, √3/2, -1/2, 1, 1/2, √3/2; positive is passage 3
    l1 = -math.log(e(2) / (e(1) + e(r3) + e(-1) + e(2) + e(1) + e(r3)))
    # q0' = -30°: cosines √3/2, -1/2, -√3/2, 0, -√3/2, -1/2
    l0r = -math.log(e(r3) / (e(r3) + e(-1) + e(-r3) + e(0) + e(-r3) + e(-1)))
    # q1' = 30°: cosines √3/2, 1/2, -√3/2, √3/2, 0, 1/2
    l1r = -math.log(e(r3) / (e(r3) + e(1) + e(-r3) + e(r3) + e(0) + e(1)))
    return l0, l1, l0r, l1r


def hand_inputs():
    # Scaled vectors: the loss must L2-normalise them itself.
    q = torch.tensor([unit(0), unit(60)], dtype=torch.float64) * torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    p = torch.tensor([unit(d) for d in P_DEG], dtype=torch.float64) * 2.0
    rq = torch.tensor([unit(-30), unit(30)], dtype=torch.float64)
    return q, p, rq


@pytest.mark.parametrize("kappa", [5.0, 1.5])
def test_hand_computed_two_by_three(kappa):
    l0, l1, l0r, l1r = hand_losses()
    eps = 1e-6
    ri = [l0 / (l0r + eps), l1 / (l1r + eps)]  # about 1.70 and 1.04: kappa=1.5 clips the first
    clamped = [min(max(r, 0.0), kappa) for r in ri]
    w = [c / sum(clamped) for c in clamped]
    expected = w[0] * l0 + w[1] * l1

    q, p, rq = hand_inputs()
    fn = RIInfoNCELoss(LossConfig(temperature=0.5, kappa=kappa, ri_start_step=0))
    out = fn(q, p, rq, step=0)
    assert out.ri_active
    assert out.per_sample.tolist() == pytest.approx([l0, l1], rel=1e-9)
    assert out.ri.tolist() == pytest.approx(ri, rel=1e-9)
    assert out.weights.tolist() == pytest.approx(w, rel=1e-9)
    assert out.value == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.unweighted_loss == pytest.approx((l0 + l1) / 2, rel=1e-9)
    assert out.ri_stats["min"] == pytest.approx(min(ri)) and out.ri_stats["max"] == pytest.approx(max(ri))
    assert out.ri_stats["median"] == pytest.approx(sum(ri) / 2)  # midpoint of two values
    if kappa == 1.5:
        assert w[0] == pytest.approx(1.5 / (1.5 + ri[1]))


def test_hand_example_before_ri_start_is_plain_mean():
    l0, l1, _, _ = hand_losses()
    q, p, rq = hand_inputs()
    fn = RIInfoNCELoss(LossConfig(temperature=0.5, ri_start_step=100))
    out = fn(q, p, rq, step=99)
    assert not out.ri_active
    assert out.value == pytest.approx((l0 + l1) / 2, rel=1e-9)
    assert out.weights.tolist() == [0.5, 0.5]
    # RI is still measured (and logged) when the caller supplies reasoning embeddings
    assert out.ri_stats["max"] > 1.5
    assert not fn.needs_reasoning(99) and fn.needs_reasoning(100)


# -- properties ------------------------------------------------------------------------------------------------------

def random_batch(b=6, g=4, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.randn(b * g, d, generator=gen, dtype=torch.float64, requires_grad=True)
    rq = torch.randn(b, d, generator=gen, dtype=torch.float64)
    return q, p, rq


def test_uniform_ri_is_basic_infonce_loss_and_gradient():
    q, p, _ = random_batch()
    ref = reference_infonce(q, p, 4).mean()
    gq, gp = torch.autograd.grad(ref, [q, p])

    fn = RIInfoNCELoss(LossConfig(ri_start_step=0))
    # No row has a reasoning query: RI := 1 everywhere, exactly uniform.
    out = fn(q, p, rq_emb=q.detach() * 0 + 1, has_reasoning=[False] * 6, step=5)
    assert out.ri_active and out.n_without_reasoning == 6
    assert torch.equal(out.ri, torch.ones(6, dtype=out.ri.dtype))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    hq, hp = torch.autograd.grad(out.loss, [q, p])
    torch.testing.assert_close(hq, gq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hp, gp, rtol=1e-10, atol=1e-12)
    assert math.isnan(out.ri_stats["mean"])  # no row had a real RI

    # Reasoning query identical to the query: RI = L/(L+ε), uniform up to ε.
    out2 = fn(q, p, rq_emb=q.detach(), step=5)
    assert out2.ri.tolist() == pytest.approx([1.0] * 6, abs=1e-5)
    assert out2.value == pytest.approx(ref.item(), rel=1e-5)
    assert out2.unweighted_loss == pytest.approx(ref.item(), rel=1e-12)


def test_weights_sum_to_one_and_follow_clamped_ri():
    q, p, rq = random_batch(b=8, seed=3)
    cfg = LossConfig(ri_start_step=0, kappa=1.2, temperature=0.05)
    out = RIInfoNCELoss(cfg)(q, p, rq, step=0)
    w, ri = out.weights, out.ri
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((w >= 0).all())
    assert bool((ri > cfg.kappa).any()) and bool((ri < cfg.kappa).any())  # the clamp is exercised
    clamped = ri.clamp(0, cfg.kappa)
    torch.testing.assert_close(w, clamped / clamped.sum())
    # the largest weight is capped: no query counts more than κ/Σ clamp(RI)
    assert float(w.max()) <= cfg.kappa / float(clamped.sum()) + 1e-12
    assert not w.requires_grad and not ri.requires_grad
    # loss = Σ w_i L_i with the weights detached: its gradient is Σ w_i ∇L_i
    ref = reference_infonce(q, p, 4, tau=0.05).detach()
    assert out.loss.item() == pytest.approx(float((w * ref).sum()), rel=1e-10)
    assert set(out.log_dict()) >= {"loss", "loss_unweighted", "ri_min", "ri_max", "ri_mean", "ri_median"}


def test_use_ri_false_and_missing_reasoning_rows():
    q, p, rq = random_batch(seed=5)
    ref = reference_infonce(q, p, 4).mean().item()
    out = RIInfoNCELoss(LossConfig(use_ri=False, ri_start_step=0))(q, p, rq, step=500)
    assert not out.ri_active and out.value == pytest.approx(ref, rel=1e-12)

    mask = [True, False, True, True, False, True]
    out = RIInfoNCELoss(LossConfig(ri_start_step=0))(q, p, rq, has_reasoning=mask, step=0)
    assert out.n_without_reasoning == 2
    assert out.ri[1].item() == 1.0 and out.ri[4].item() == 1.0
    real = out.ri[torch.tensor(mask)]
    assert out.ri_stats["min"] == pytest.approx(float(real.min()))
    assert out.ri_stats["median"] == pytest.approx(float(real.quantile(0.5)))


def test_bf16_embeddings_are_scored_in_float32():
    q, p, rq = random_batch(seed=9)
    qb, pb, rqb = q.detach().bfloat16().requires_grad_(), p.detach().bfloat16().requires_grad_(), rq.bfloat16()
    fn = RIInfoNCELoss(LossConfig(ri_start_step=0))
    out = fn(qb, pb, rqb, step=0)
    ref = fn(qb.detach().double(), pb.detach().double(), rqb.double(), step=0)  # same values, float64
    assert out.per_sample.dtype == torch.float32
    assert out.value == pytest.approx(ref.value, rel=1e-5)
    out.loss.backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


def test_bad_shapes_and_config_errors():
    fn = RIInfoNCELoss()
    q, p, rq = random_batch()
    with pytest.raises(ValueError, match="B·G rows"):
        fn(q, p[:-1])
    with pytest.raises(ValueError, match="rq_emb shape"):
        fn(q, p, rq[:-1])
    with pytest.raises(ValueError, match="has_reasoning has 2 entries"):
        fn(q, p, rq, has_reasoning=[True, False])
    with pytest.raises(ConfigError, match="temprature: unknown key"):
        load_model(LossConfig, overrides=["temprature=0.05"])
    assert all(f.description for f in LossConfig.model_fields.values())


def test_docstring_example_runs():
    """The Example section of RIInfoNCELoss is self-contained: run it as a doctest."""
    import doctest

    from reasonembed.redapter import loss

    tests = [t for t in doctest.DocTestFinder().find(RIInfoNCELoss, "RIInfoNCELoss", module=loss) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# -- two real gloo processes ------------------------------------------------------------------------------------------

WORLD, B, G, D_IN, D_OUT = 2, 3, 4, 8, 6
CASES = {  # name: (LossConfig kwargs, step)
    "basic": ({"ri_start_step": 100}, 0),
    "ri": ({"ri_start_step": 1, "kappa": 1.3, "temperature": 0.1}, 7),
}


def global_inputs():
    gen = torch.Generator().manual_seed(1234)
    xq = torch.randn(WORLD * B, D_IN, generator=gen, dtype=torch.float64)
    xp = torch.randn(WORLD * B * G, D_IN, generator=gen, dtype=torch.float64)
    xr = xq + 0.7 * torch.randn(WORLD * B, D_IN, generator=gen, dtype=torch.float64)
    has_rq = torch.tensor([True, False, True, True, True, False])
    return xq, xp, xr, has_rq


def make_encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 10), torch.nn.Tanh(), torch.nn.Linear(10, D_OUT)).double()


def run_case(model, module, xq, xp, xr, has_rq, case) -> tuple[LossOutput, list[torch.Tensor]]:
    kwargs, step = CASES[case]
    fn = RIInfoNCELoss(LossConfig(**kwargs))
    model.zero_grad(set_to_none=True)
    emb = model(torch.cat([xq, xp]))  # one forward through DDP per backward
    q, p = emb[: len(xq)], emb[len(xq):]
    with torch.no_grad():
        rq = module(xr)
    out = fn(q, p, rq, has_reasoning=has_rq, step=step)
    out.loss.backward()
    return out, [prm.grad.detach().clone() for prm in module.parameters()]


def _worker(rank: int, result_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    # A file store, not tcp://<free port>: under a loaded suite another process could take the port between picking
    # it and binding it (the run then died with SIGABRT in one rank).
    dist.init_process_group("gloo", init_method=f"file://{result_dir}/store", rank=rank, world_size=WORLD)
    try:
        xq, xp, xr, has_rq = global_inputs()
        sl_q, sl_p = slice(rank * B, (rank + 1) * B), slice(rank * B * G, (rank + 1) * B * G)
        module = make_encoder()
        model = DDP(module)
        results = {}
        for case in CASES:
            out, grads = run_case(model, module, xq[sl_q], xp[sl_p], xr[sl_q], has_rq[sl_q], case)
            results[case] = {"value": out.value, "unweighted": out.unweighted_loss, "weights": out.weights,
                             "per_sample": out.per_sample, "ri_stats": out.ri_stats, "grads": grads,
                             "n_without": out.n_without_reasoning, "active": out.ri_active}
        # unequal shards must fail on every rank with a clear message, not hang or mislabel
        try:
            n = B if rank == 0 else B - 1
            RIInfoNCELoss()(torch.randn(n, D_OUT), torch.randn(n * G, D_OUT))
        except ValueError as exc:
            results["mismatch_error"] = str(exc)
        torch.save(results, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cross_device_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    xq, xp, xr, has_rq = global_inputs()
    module = make_encoder()
    for case in CASES:
        single, grads = run_case(module, module, xq, xp, xr, has_rq, case)
        assert single.ri_active == (case == "ri")
        for r in ranks:
            res = r[case]
            assert res["value"] == pytest.approx(single.value, rel=1e-12)
            assert res["unweighted"] == pytest.approx(single.unweighted_loss, rel=1e-12)
            assert res["n_without"] == single.n_without_reasoning == 2
            assert res["active"] == single.ri_active
            for k in ("min", "max", "mean", "median"):
                assert res["ri_stats"][k] == pytest.approx(single.ri_stats[k], rel=1e-12)
            # DDP averages the gradients over the 2 ranks; the loss scaling makes that the global gradient
            for g_dist, g_single in zip(res["grads"], grads, strict=True):
                torch.testing.assert_close(g_dist, g_single, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.cat([r[case]["weights"] for r in ranks]), single.weights)
        torch.testing.assert_close(torch.cat([r[case]["per_sample"] for r in ranks]), single.per_sample)
    assert not torch.allclose(ranks[0]["ri"]["weights"], torch.full((B,), 1 / (WORLD * B), dtype=torch.float64))
    for r in ranks:
        assert "rank 0: (3, 12), rank 1: (2, 8)" in r["mismatch_error"]
