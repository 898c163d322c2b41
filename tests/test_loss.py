"""Decoupled PPO / GSPO / KL / entropy losses against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from areal.trainer.loss import aggregate, decoupled_ppo_loss, entropy_bonus, gspo_loss, kl_penalty, loglinear_proximal

torch.set_num_threads(1)

# Four valid tokens + one padding token. Per token: u = πθ/πprox, w = πprox/πbehav, A.
#   t0: u=1.5, w=1, A=+1  -> min(1.5, 1.2)       = 1.2   -> L = -1.2   (clipped)
#   t1: u=0.5, w=2, A=-2  -> min(-1.0, 0.8*-2)   = -1.6  -> L = 2*1.6 = 3.2 (clipped)
#   t2: u=1.0, w=8, A=0.5 -> 0.5; w truncated to 5        -> L = -2.5 (masked in "mask" mode)
#   t3: u=3.0, w=1, A=-1  -> min(-3, -1.2)       = -3    -> L = 3;  dual clip c=2 -> L = 2
#   t4: padding, garbage values (huge w) that must not leak in
U = [1.5, 0.5, 1.0, 3.0, 7.0]
W = [1.0, 2.0, 8.0, 1.0, 1e30]
A = [1.0, -2.0, 0.5, -1.0, 100.0]
MASK = [1, 1, 1, 1, 0]


def _tensors(shape=None):
    prox = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0], dtype=torch.float64)
    logp = (prox + torch.tensor([math.log(u) for u in U], dtype=torch.float64)).requires_grad_()
    behav = prox - torch.tensor([math.log(w) for w in W], dtype=torch.float64)
    adv = torch.tensor(A, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.bool)
    return logp, prox, behav, adv, mask


def test_decoupled_ppo_hand_values_and_stats():
    logp, prox, behav, adv, mask = _tensors()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, behaviour_weight_cap=5.0)
    assert loss.item() == pytest.approx((-1.2 + 3.2 - 2.5 + 3.0) / 4)
    loss.backward()
    # only unclipped tokens carry gradient: dL/dlogθ = -w u A / 4
    expected_grad = [0.0, 0.0, -5 * 1.0 * 0.5 / 4, -1 * 3.0 * -1.0 / 4, 0.0]
    assert logp.grad.tolist() == pytest.approx(expected_grad)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["dual_clip_fraction"].item() == 0.0
    assert stats["behaviour_capped_fraction"].item() == pytest.approx(0.25)
    assert stats["importance_weight_mean"].item() == pytest.approx((1 + 2 + 8 + 1) / 4)
    assert stats["importance_weight_max"].item() == pytest.approx(8.0)
    assert stats["importance_weight_min"].item() == pytest.approx(1.0)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 3.0) / 4)
    k3 = sum((u - 1) - math.log(u) for u in U[:4]) / 4
    assert stats["approx_kl"].item() == pytest.approx(k3)
    assert stats["num_valid_tokens"].item() == 4
    assert all(not v.requires_grad for v in stats.values())


def test_dual_clip_caps_negative_advantage_loss():
    logp, prox, behav, adv, mask = _tensors()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, dual_clip=2.0)
    assert loss.item() == pytest.approx((-1.2 + 3.2 - 2.5 + 2.0) / 4)
    assert stats["dual_clip_fraction"].item() == pytest.approx(0.25)
    loss.backward()
    assert logp.grad[3].item() == 0.0  # the dual-clipped token is constant in θ
    with pytest.raises(ValueError):
        decoupled_ppo_loss(logp, prox, behav, adv, mask, dual_clip=1.0)


def test_behaviour_mask_mode_and_no_cap():
    logp, prox, behav, adv, mask = _tensors()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, behaviour_weight_mode="mask")
    assert loss.item() == pytest.approx((-1.2 + 3.2 + 3.0) / 3)  # t2 left the mask
    assert stats["num_valid_tokens"].item() == 3
    assert stats["behaviour_capped_fraction"].item() == pytest.approx(0.25)
    loss_nocap, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask, behaviour_weight_cap=None)
    assert loss_nocap.item() == pytest.approx((-1.2 + 3.2 - 8 * 0.5 + 3.0) / 4)


def test_sequence_aggregations_padded_and_packed():
    logp, prox, behav, adv, mask = _tensors()
    # rows: [t0, t1, t2] and [t3, pad, pad]
    order = torch.tensor([0, 1, 2, 3, 4, 4])
    as_rows = [t.detach()[order].reshape(2, 3) for t in (logp, prox, behav, adv)]
    mask2 = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    row0, row1 = (-1.2 + 3.2 - 2.5) / 3, 3.0
    loss, _ = decoupled_ppo_loss(*as_rows, mask2, aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    loss, _ = decoupled_ppo_loss(*as_rows, mask2, aggregation="token-mean")
    assert loss.item() == pytest.approx((-1.2 + 3.2 - 2.5 + 3.0) / 4)
    loss, _ = decoupled_ppo_loss(*as_rows, mask2, aggregation="seq-mean-token-sum-norm", max_tokens_norm=4)
    assert loss.item() == pytest.approx(((-1.2 + 3.2 - 2.5) / 4 + 3.0 / 4) / 2)
    loss, _ = decoupled_ppo_loss(*as_rows, mask2, aggregation="seq-mean-token-mean", behaviour_weight_mode="mask")
    assert loss.item() == pytest.approx(((-1.2 + 3.2) / 2 + 3.0) / 2)
    # packed [N] with arbitrary sequence ids gives the same as the padded rows
    packed_ids = torch.tensor([5, 5, 5, 9, 9])
    loss_packed, _ = decoupled_ppo_loss(
        logp, prox, behav, adv, mask, aggregation="seq-mean-token-mean", sequence_ids=packed_ids
    )
    assert loss_packed.item() == pytest.approx((row0 + row1) / 2)
    with pytest.raises(ValueError):
        decoupled_ppo_loss(logp, prox, behav, adv, mask, aggregation="seq-mean-token-sum-norm")


def test_reduces_to_standard_ppo_when_proximal_is_behaviour():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 7, generator=g, dtype=torch.float64) - 2
    logp = (old + 0.4 * torch.randn(4, 7, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.3
    loss, stats = decoupled_ppo_loss(logp, old, old, adv, mask, eps_clip_low=0.2, eps_clip_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    # hand-written PPO: token mean of -min(r A, clip(r, 0.8, 1.28) A)
    total, count = 0.0, 0
    for i in range(4):
        for j in range(7):
            if mask[i, j]:
                r = math.exp(logp[i, j].item() - old[i, j].item())
                a = adv[i, j].item()
                total += -min(r * a, min(max(r, 0.8), 1.28) * a)
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-12)
    assert stats["importance_weight_max"].item() == 1.0
    ref_logp = logp.detach().clone().requires_grad_()
    r = torch.exp(ref_logp - old)
    ppo = -torch.min(r * adv, r.clamp(0.8, 1.28) * adv)
    ((ppo * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(grad, ref_logp.grad)


def test_no_valid_tokens_gives_zero_not_nan():
    logp, prox, behav, adv, _ = _tensors()
    empty = torch.zeros(5, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, empty, aggregation=agg)
        assert loss.item() == 0.0 and not any(torch.isnan(v).any() for v in stats.values())


def test_gspo_sequence_ratio_hand_values():
    # row 0: log ratios 0.2, -0.1 -> s0 = e^0.05, A=+1 -> clipped at 1 + 4e-4
    # row 1: log ratio 3e-4 (one token), A=-1 -> s1 = e^3e-4 inside [1-3e-4, 1+4e-4]
    prox = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], dtype=torch.float64)
    logp = (prox + torch.tensor([[0.2, -0.1], [3e-4, 5.0]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    s1 = math.exp(3e-4)
    loss, stats = gspo_loss(logp, prox, prox, adv, mask)
    assert loss.item() == pytest.approx((-(1 + 4e-4) + s1) / 2, rel=1e-12)
    loss.backward()
    # row 0 clipped (no grad); row 1: d(s1)/dlogθ = s1 / |y_1| = s1, halved by the sequence mean
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, s1 / 2, 0.0])
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)  # both tokens of row 0


def test_kl_estimators_hand_values():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])  # r = pi_ref / pi_theta = 0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")
    # exact KL of two 3-way distributions equals E_{x~θ}[k1] and E_{x~θ}[k3]
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for kind in ("k1", "k3"):
        assert (p * kl_penalty(p.log(), q.log(), kind)).sum().item() == pytest.approx(kl)


def test_entropy_bonus_and_aggregate():
    ent = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert entropy_bonus(ent, mask, 0.1).item() == pytest.approx(-0.1 * 6.0 / 3)
    assert aggregate(ent, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 2.0) / 2)
    with pytest.raises(ValueError):
        aggregate(ent, mask, "sum")


def test_loglinear_proximal_hand_values():
    """A-3PO: alpha = (v - v_b) / (v + 1 - v_b); fresh tokens keep pi_behav, padding (version -1) too."""
    behaviour = torch.tensor([-1.0, -1.0, -1.0, -1.0, -2.0])
    current = torch.tensor([-3.0, -3.0, -3.0, -3.0, -5.0], requires_grad=True)
    versions = torch.tensor([5, 4, 3, 1, -1])
    prox = loglinear_proximal(behaviour, current, versions, version=5)
    alphas = torch.tensor([0.0, 1 / 2, 2 / 3, 4 / 5, 0.0])
    torch.testing.assert_close(prox, behaviour + alphas * (current.detach() - behaviour))
    assert not prox.requires_grad
    # the weight pi_prox / pi_behav is (pi_theta / pi_behav) ** alpha: between 1 and the exact one
    w = torch.exp(prox - behaviour)[:4]
    exact = torch.exp(current.detach() - behaviour)[:4]
    assert torch.all((w <= 1.0) & (w >= exact))
