"""Advantage estimators and reward shaping against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from areal.trainer.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    filter_uniform_groups,
    gae_advantages,
    group_advantages,
    overlong_penalty,
    reinforce_plus_plus_advantages,
)

torch.set_num_threads(1)


def _close(t, expected, abs_=1e-6):
    assert t.flatten().tolist() == pytest.approx(expected, abs=abs_)


def test_grpo_population_std_and_unbiased_option():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 2.0]])
    adv = group_advantages(r, "grpo")
    # group 0: mean 0.5, population std 0.5; group 1: mean 2, std sqrt(0.5)
    s1 = math.sqrt(0.5)
    _close(adv, [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)] * 1 + [-0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)]
           + [-1 / (s1 + 1e-6), 0.0, 1 / (s1 + 1e-6), 0.0])  # fmt: skip
    unbiased = group_advantages(r[:1], "grpo", unbiased_std=True)
    sd = math.sqrt(4 * 0.25 / 3)
    _close(unbiased, [0.5 / (sd + 1e-6), -0.5 / (sd + 1e-6), -0.5 / (sd + 1e-6), 0.5 / (sd + 1e-6)])


def test_dr_grpo_and_rloo():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    _close(group_advantages(r, "dr_grpo"), [-1.0, 0.0, 1.0])
    # leave-one-out: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2
    _close(group_advantages(r, "rloo"), [-1.5, 0.0, 1.5])


def test_degenerate_groups_give_zero_not_nan():
    equal = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    single = torch.tensor([[3.0], [-1.0]])
    for method in ("grpo", "dr_grpo", "rloo"):
        _close(group_advantages(equal, method), [0.0] * 6)
        _close(group_advantages(single, method), [0.0, 0.0])
    _close(group_advantages(single, "grpo", unbiased_std=True), [0.0, 0.0])
    _close(group_advantages(torch.tensor([[1, 0]]), "grpo"), [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)])  # int rewards
    with pytest.raises(ValueError):
        group_advantages(equal, "ppo")


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [0, 1, 1]]))
    _close(out, [2.0, 2.0, 0.0, 0.0, -1.0, -1.0])


def test_reinforce_plus_plus_batch_normalisation():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), mask)
    # returns: row 0 [1, 1, 1], row 1 [0, 0]; mean 0.6, population std sqrt(0.24)
    sd = math.sqrt(0.24)
    _close(adv, [0.4 / sd, 0.4 / sd, 0.4 / sd, -0.6 / sd, -0.6 / sd, 0.0], abs_=1e-5)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 9.0]])
    adv_kl = reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), mask, kl=kl, kl_coef=0.5)
    # token rewards row 0 [-0.05, -0.1, 0.85] -> returns [0.7, 0.75, 0.85]; row 1 [-0.25, 0] -> [-0.25, 0]
    g = [0.7, 0.75, 0.85, -0.25, 0.0]
    mean = sum(g) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in g) / 5)
    _close(adv_kl, [(x - mean) / (sd + 1e-6) for x in g] + [0.0], abs_=1e-5)


def test_discounted_returns_with_padding():
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    _close(discounted_returns(r, mask, gamma=0.5), [0.25, 0.5, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0])


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.9*0.7 - 0.6 = 0.03; δ0 = 0.9*0.6 - 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712
    _close(adv, [0.21712, 0.246, 0.3, 0.0])
    _close(ret, [0.71712, 0.846, 1.0, 0.0])
    assert not adv.requires_grad and not ret.requires_grad
    # gamma = lam = 1 gives Monte-Carlo return minus value
    adv1, _ = gae_advantages(rewards, values, mask)
    _close(adv1, [0.5, 0.4, 0.3, 0.0])


def test_overlong_penalty():
    lengths = torch.tensor([50, 80, 90, 100, 120])
    _close(overlong_penalty(lengths, max_len=100, buffer_len=20), [0.0, 0.0, -0.5, -1.0, -1.0])
    _close(overlong_penalty(lengths, max_len=100, buffer_len=20, penalty_factor=2.0), [0.0, 0.0, -1.0, -2.0, -2.0])
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_len=100, buffer_len=0)


def test_filter_uniform_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0001]])
    assert filter_uniform_groups(r).tolist() == [False, True, True]
    assert filter_uniform_groups(r, atol=1e-3).tolist() == [False, True, False]
