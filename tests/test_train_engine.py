"""Batch layout and one decoupled-PPO update of the train engine."""

import pytest
import torch

from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine
from areal.trajectory import Group, Trajectory


def make_groups():
    t = lambda p, c, lp, r: Trajectory(p, c, lp, [0] * len(c), reward=r)  # noqa: E731
    return [
        Group(0, [t([5, 6, 7], [8, 9, 1], [-1.0, -2.0, -0.5], 1.0), t([5, 6, 7], [10], [-3.0], 0.0)]),
        Group(1, [t([11, 12], [13, 14], [-0.1, -0.2], 0.0), t([11, 12], [15, 1], [-0.3, -0.4], 1.0)]),
    ]


def test_batch_aligns_targets_with_completions():
    batch = build_batch(make_groups(), [[0.5, -0.5], [1.0, -1.0]], pad_token_id=0)
    assert batch.input_ids.tolist()[0] == [5, 6, 7, 8, 9, 1]
    assert batch.input_ids.tolist()[1] == [5, 6, 7, 10, 0, 0]
    # target t is token t+1: completion of row 0 are targets 2..4
    assert batch.loss_mask.tolist()[0] == [0, 0, 1, 1, 1]
    assert batch.labels.tolist()[0][2:5] == [8, 9, 1]
    assert batch.behaviour_logprobs.tolist()[0][2:5] == [-1.0, -2.0, -0.5]
    assert batch.loss_mask.tolist()[1] == [0, 0, 1, 0, 0]
    assert batch.advantages.tolist()[1][2] == -0.5 and batch.advantages.tolist()[1][3] == 0.0
    assert batch.loss_mask.tolist()[2] == [0, 1, 1, 0, 0]
    assert batch.versions.tolist()[3] == [-1, 0, 0, -1, -1]


def test_recomputed_logprobs_match_a_plain_forward(tiny_qwen2):
    engine = TrainEngine(tiny_qwen2, TrainerConfig(), temperature=0.8)
    batch = build_batch(make_groups(), [[1, -1], [1, -1]], pad_token_id=0)
    prox = engine.proximal_logprobs(batch)
    with torch.no_grad():
        logits = tiny_qwen2(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / 0.8
    ref = torch.log_softmax(logits, -1).gather(-1, batch.labels[..., None]).squeeze(-1) * batch.loss_mask
    torch.testing.assert_close(prox, ref, atol=1e-5, rtol=0)


def test_train_step_raises_the_logprob_of_positive_advantage_tokens(tiny_qwen2):
    cfg = TrainerConfig(lr=1e-2, minibatches=1, eps_clip_low=10.0, eps_clip_high=10.0)
    engine = TrainEngine(tiny_qwen2, cfg, temperature=1.0)
    groups = make_groups()
    batch = build_batch(groups, [[1.0, -1.0], [-1.0, 1.0]], pad_token_id=0)
    before = engine.proximal_logprobs(batch)
    stats = engine.train_step(batch)
    after = engine.proximal_logprobs(batch)
    delta = ((after - before) * batch.loss_mask).sum(-1) / batch.loss_mask.sum(-1)
    assert delta[0] > 0 and delta[3] > 0 and delta[1] < 0 and delta[2] < 0
    assert engine.version == 1
    for key in ("train/loss", "train/clip_fraction", "train/grad_norm", "time/proximal_s", "train/tokens_per_s"):
        assert key in stats and stats[key] == stats[key]


def test_naive_ppo_uses_behaviour_as_proximal(tiny_qwen2):
    cfg = TrainerConfig(decoupled=False, lr=0.0)
    engine = TrainEngine(tiny_qwen2, cfg, temperature=1.0)
    batch = build_batch(make_groups(), [[1.0, -1.0], [-1.0, 1.0]], pad_token_id=0)
    stats = engine.train_step(batch)
    assert stats["time/proximal_s"] == pytest.approx(0.0, abs=1e-3)


def test_entropy_bonus_enters_the_loss(tiny_qwen2):
    """trainer.entropy_coef subtracts coef x the aggregated entropy from the same loss."""
    import copy

    out = {}
    for coef in (0.0, 0.5):
        engine = TrainEngine(copy.deepcopy(tiny_qwen2), TrainerConfig(entropy_coef=coef), temperature=1.0)
        out[coef] = engine.train_step(build_batch(make_groups(), None, pad_token_id=0))
    assert out[0.5]["train/entropy"] == pytest.approx(out[0.0]["train/entropy"], rel=1e-6)
    assert out[0.5]["train/loss"] == pytest.approx(out[0.0]["train/loss"] - 0.5 * out[0.0]["train/entropy"], abs=1e-6)



def _one_update(model, groups, version=0, **cfg):
    import copy

    engine = TrainEngine(copy.deepcopy(model), TrainerConfig(lr=1e-2, minibatches=2, **cfg), temperature=1.0)
    engine.version = version  # the groups' tokens are of version 0
    stats = engine.train_step(build_batch(groups, [[1.0, -1.0], [-1.0, 1.0]], pad_token_id=0))
    return engine, stats


def _same_weights(a, b) -> bool:
    return all(torch.allclose(x, y, atol=1e-6, rtol=0) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_a3po_on_fresh_tokens_is_naive_ppo_without_the_proximal_pass(tiny_qwen2):
    """Tokens of the trainer's own version: alpha = 0, so A-3PO's pi_prox is pi_behav exactly."""
    fresh, stats = _one_update(tiny_qwen2, make_groups(), proximal="loglinear")
    naive, _ = _one_update(tiny_qwen2, make_groups(), decoupled=False)
    assert _same_weights(fresh, naive)
    assert stats["time/proximal_s"] == pytest.approx(0.0, abs=1e-3)


def test_a3po_on_stale_tokens_is_neither_naive_nor_exact(tiny_qwen2):
    """One version behind (alpha = 1/2): pi_prox moves halfway from pi_behav towards pi_theta."""
    approx, stats = _one_update(tiny_qwen2, make_groups(), version=1, proximal="loglinear")
    naive, _ = _one_update(tiny_qwen2, make_groups(), version=1, decoupled=False)
    exact, _ = _one_update(tiny_qwen2, make_groups(), version=1)
    assert not _same_weights(approx, naive) and not _same_weights(approx, exact)
    assert stats["train/importance_weight_mean"] != pytest.approx(1.0, abs=1e-4)
    assert all(v == v for v in stats.values())  # no NaN


def test_in_step_updates_see_the_weights_after_each_minibatch_but_the_last(tiny_qwen2):
    """trainer.publish_every=minibatch: after_update(k) runs after optimizer updates 1..M-1 (the last one
    is the new version, published by the loop), each time with weights the previous one has not seen."""
    import copy

    engine = TrainEngine(copy.deepcopy(tiny_qwen2), TrainerConfig(lr=1e-2, minibatches=4), temperature=1.0)
    seen = [{n: t.clone() for n, t in engine.named_weights()}]
    calls = []

    def after_update(k):
        calls.append((k, engine.version))
        seen.append({n: t.clone() for n, t in engine.named_weights()})

    groups = make_groups()
    engine.train_step(build_batch(groups, [[1.0, -1.0], [-1.0, 1.0]], pad_token_id=0), after_update=after_update)
    assert calls == [(1, 0), (2, 0), (3, 0)]  # labelled with the last whole version
    seen.append(dict(engine.named_weights()))
    for before, after in zip(seen, seen[1:]):
        assert any(not torch.equal(before[n], after[n]) for n in before)
