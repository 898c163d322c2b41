"""Algorithm family wiring: advantages chosen by config, KL (loss / reward), critic, overlong."""

import math

import pytest
import torch

from areal.config import build
from areal.recipe import Recipe
from areal.trainer.advantages import GROUP_METHODS, grouped_advantages
from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.critic import clipped_value_loss
from areal.trainer.engine import TrainEngine
from areal.trajectory import Group, Trajectory


def groups_2x2():
    t = lambda p, c, r: Trajectory(p, c, [-1.0] * len(c), [0] * len(c), reward=r)  # noqa: E731
    return [Group(0, [t([5, 6], [7, 8, 9], 1.0), t([5, 6], [10], 0.0)]),
            Group(1, [t([11], [12, 13], 0.0), t([11], [14, 15, 16, 17], 0.0)])]


def test_grouped_advantages_by_method_name():
    """The critic-free estimators the engine runs, named as in TrainerConfig.advantage."""
    r, one_group = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long)  # mean 0.5, population std 0.5
    expected = {"grpo": [1.0, -1.0, -1.0, 1.0], "dr_grpo": [0.5, -0.5, -0.5, 0.5],
                "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3]}  # rloo: 1 - mean(0, 0, 1) = 2/3
    assert set(expected) == set(GROUP_METHODS)
    for method, want in expected.items():
        torch.testing.assert_close(grouped_advantages(r, one_group, method), torch.tensor(want), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        grouped_advantages(r, one_group, "ppo_gae")  # engine-side estimators are not group methods


def test_grouped_advantages_handles_ragged_groups():
    a = grouped_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0]), torch.tensor([0, 0, 1, 1, 1]), "dr_grpo")
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 1.0, 1.0, -2.0]))


def test_engine_grpo_matches_the_loop_computation(tiny_qwen2):
    engine = TrainEngine(tiny_qwen2, TrainerConfig(advantage="grpo"), temperature=1.0)
    batch = build_batch(groups_2x2(), None, pad_token_id=0)
    adv, returns = engine._advantages(batch, batch.behaviour_logprobs, None, None)
    assert returns is None
    # group 0: rewards (1, 0) -> (+1, -1); group 1: all equal -> 0; broadcast to completion targets
    assert adv[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0], abs=1e-5)
    assert adv[1].tolist()[1] == pytest.approx(-1.0, abs=1e-5) and adv[1].sum() == pytest.approx(-1.0, abs=1e-5)
    assert adv[2:].abs().sum() == 0


def test_engine_refuses_precomputed_advantages_for_engine_side_estimators(tiny_qwen2):
    engine = TrainEngine(tiny_qwen2, TrainerConfig(advantage="reinforce_pp"), temperature=1.0)
    batch = build_batch(groups_2x2(), [[1, -1], [0, 0]], pad_token_id=0)
    with pytest.raises(ValueError, match="advantages=None"):
        engine.train_step(batch)


def test_overlong_penalty_enters_the_reward(tiny_qwen2):
    # max 4 new tokens, buffer 2: lengths 3 -> -0.5, 1 -> 0, 2 -> 0, 4 -> -1 (penalty factor 1)
    cfg = TrainerConfig(advantage="dr_grpo", overlong_buffer=2, overlong_penalty=1.0)
    engine = TrainEngine(tiny_qwen2, cfg, temperature=1.0, max_new_tokens=4)
    batch = build_batch(groups_2x2(), None, pad_token_id=0)
    adv, _ = engine._advantages(batch, batch.behaviour_logprobs, None, None)
    per_seq = adv.sum(1) / batch.loss_mask.sum(1)
    # group 0: rewards (0.5, 0) -> (0.25, -0.25); group 1: (0, -1) -> (0.5, -0.5)
    torch.testing.assert_close(per_seq, torch.tensor([0.25, -0.25, 0.5, -0.5]))


def test_kl_in_reward_is_summed_per_sequence(tiny_qwen2):
    cfg = TrainerConfig(advantage="dr_grpo", kl_coef=0.5, kl_mode="reward", kl_estimator="k1")
    engine = TrainEngine(tiny_qwen2, cfg, temperature=1.0)
    batch = build_batch(groups_2x2(), None, pad_token_id=0)
    prox = batch.loss_mask * -1.0
    ref = batch.loss_mask * -2.0  # k1 = logp - logref = 1 per token
    adv, _ = engine._advantages(batch, prox, ref, None)
    per_seq = adv.sum(1) / batch.loss_mask.sum(1)
    # rewards - 0.5 * length: group 0: 1 - 1.5 = -0.5, 0 - 0.5 = -0.5 -> (0, 0); group 1: -1, -2 -> (0.5, -0.5)
    torch.testing.assert_close(per_seq, torch.tensor([0.0, 0.0, 0.5, -0.5]))


def test_reference_model_only_when_kl_is_on_and_kl_loss_starts_at_zero(tiny_qwen2):
    assert TrainEngine(tiny_qwen2, TrainerConfig(), temperature=1.0).ref_model is None
    cfg = TrainerConfig(kl_coef=0.1, kl_mode="loss", lr=5e-2, advantage="dr_grpo")
    engine = TrainEngine(tiny_qwen2, cfg, temperature=1.0)
    assert all(not p.requires_grad for p in engine.ref_model.parameters()) and not engine.ref_model.training
    batch = build_batch(groups_2x2(), None, pad_token_id=0)
    first = engine.train_step(batch)
    assert first["train/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    second = engine.train_step(batch)
    assert second["train/kl_ref"] > 1e-6


def test_clipped_value_loss_hand_values():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 2.0])
    # token 0: plain 1, clipped V = 0.2 -> 0.04, max = 1 -> 0.5; token 1: plain 4, clipped (0 - 2)^2 = 4 -> 2
    torch.testing.assert_close(clipped_value_loss(v, old, ret, 0.2), torch.tensor([0.5, 2.0]))
    v2 = torch.tensor([0.5])  # moved towards the return: plain (0.5-2)^2=2.25, clipped (0.2-2)^2=3.24 -> max
    assert clipped_value_loss(v2, torch.tensor([0.0]), torch.tensor([2.0]), 0.2).item() == pytest.approx(1.62)
    assert clipped_value_loss(v2, torch.tensor([0.0]), torch.tensor([2.0]), 0.0).item() == pytest.approx(1.125)


def test_ppo_gae_trains_a_critic(tiny_qwen2):
    cfg = TrainerConfig(advantage="ppo_gae", lr=1e-2, critic_lr=3e-3, gae_gamma=1.0, gae_lambda=1.0)
    engine = TrainEngine(tiny_qwen2, cfg, temperature=1.0)
    batch = build_batch(groups_2x2(), None, pad_token_id=0)
    # zero-initialised head: V = 0, so with gamma = lambda = 1 every token's advantage is its sequence reward,
    # whitened over the batch's 10 tokens (3 tokens of reward 1, 7 of 0)
    values = torch.zeros_like(batch.loss_mask)
    adv, returns = engine._advantages(batch, batch.behaviour_logprobs, None, values)
    torch.testing.assert_close(returns[0], batch.loss_mask[0])
    mean, std = 0.3, math.sqrt(0.21)
    assert adv[0, 1].item() == pytest.approx((1 - mean) / std, abs=1e-4)
    assert adv[1, 1].item() == pytest.approx((0 - mean) / std, abs=1e-4)
    losses = [engine.train_step(batch)["train/value_loss"] for _ in range(8)]
    assert losses[0] == pytest.approx(0.5 * 0.3, abs=1e-6)  # 0.5 * mean(R^2) with V = 0
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("advantage", ["reinforce_pp", "rloo"])
def test_engine_side_estimators_train(tiny_qwen2, advantage):
    cfg = TrainerConfig(advantage=advantage, policy_loss="gspo", eps_clip_low=3e-4, eps_clip_high=4e-4)
    stats = TrainEngine(tiny_qwen2, cfg, temperature=1.0).train_step(build_batch(groups_2x2(), None, 0))
    assert math.isfinite(stats["train/loss"]) and stats["train/grad_norm"] > 0


def test_algorithm_options_from_a_recipe():
    recipe = build(Recipe, None, ["trainer.advantage=ppo_gae", "trainer.policy_loss=gspo", "trainer.kl_coef=0.01",
                                  "trainer.kl_estimator=k2", "trainer.max_tokens_per_microbatch=512",
                                  "trainer.backend=deepspeed", "trainer.zero_stage=3"])
    tr = recipe.trainer
    assert (tr.advantage, tr.policy_loss, tr.kl_coef, tr.kl_estimator) == ("ppo_gae", "gspo", 0.01, "k2")
    assert (tr.max_tokens_per_microbatch, tr.backend, tr.zero_stage) == (512, "deepspeed", 3)
