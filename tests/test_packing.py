"""Packed micro-batches: bin packing, packed == unpacked log-probs, loss and gradients."""

import copy

import pytest
import torch

from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine
from areal.trainer.loss import decoupled_ppo_loss, gspo_loss
from areal.trainer.packing import (balanced_partition, make_microbatches, pack_groups, pack_rows, shared_prefix_mask,
                                  split_balanced)
from areal.trajectory import Group, Trajectory


def test_balanced_partition_hand_example():
    # total 55, budget 20 -> 3 bins; longest-first into the lightest bin gives loads 19, 18, 18
    bins = balanced_partition([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], 20)
    assert bins == [[0, 5, 6], [1, 4, 7], [2, 3, 8, 9]]


def test_balanced_partition_budget_and_oversized():
    lengths = [30, 5, 5, 12, 9, 9, 1]
    bins = balanced_partition(lengths, 20)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [0] in bins  # longer than the budget: alone
    assert all(sum(lengths[i] for i in b) <= 20 for b in bins if b != [0])
    assert len(bins) == 1 + 3  # 41 tokens of the rest need at least 3 bins of 20


def test_balanced_partition_retries_with_more_bins_when_greedy_overflows():
    # ceil(32 / 20) = 2 bins, but 11 | 11 then 10 overflows either bin -> 3 bins
    assert balanced_partition([11, 11, 10], 20) == [[0], [1], [2]]
    assert balanced_partition([11, 9, 11], 20) == [[0, 1], [2]]  # 31 tokens: 11 + 9 = 20 fits


def test_split_balanced_gives_exactly_k_parts():
    parts = split_balanced([5, 4, 3, 3, 1], 2)
    assert parts == [[0, 3], [1, 2, 4]]  # loads 8 and 8


def skewed_groups(seed=0, groups=3, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(groups):
        prompt = torch.randint(3, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        trajs = []
        for _ in range(n):
            c = int(torch.randint(1, 14, (1,), generator=g))
            comp = torch.randint(3, 40, (c,), generator=g).tolist()
            lp = (-torch.rand(c, generator=g) * 3).tolist()
            trajs.append(Trajectory(prompt, comp, lp, [0] * c, reward=float(torch.rand(1, generator=g) > 0.5)))
        out.append(Group(gi, trajs))
    return out


def padded_reference_logprobs(model, batch, temperature):
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, batch.labels[..., None]).squeeze(-1) * batch.loss_mask


@pytest.mark.parametrize("attention", ["varlen", "model"])
def test_packed_logprobs_equal_unpacked(tiny_qwen2, attention):
    batch = build_batch(skewed_groups(), [[1.0] * 3] * 3, pad_token_id=0)
    with torch.no_grad():
        ref = padded_reference_logprobs(tiny_qwen2, batch, 0.7)
    cfg = TrainerConfig(max_tokens_per_microbatch=24, packed_attention=attention)
    engine = TrainEngine(tiny_qwen2, cfg, temperature=0.7)
    mbs = make_microbatches(batch.input_ids, batch.attention_mask, batch.loss_mask,
                            torch.arange(batch.num_sequences), 24)
    assert len(mbs) > 2 and all(mb.input_ids.shape[0] == 1 for mb in mbs)  # really packed, several rows
    torch.testing.assert_close(engine.proximal_logprobs(batch), ref, atol=1e-5, rtol=0)


def test_pack_rows_layout():
    ids = torch.tensor([[5, 6, 7, 4], [8, 9, 0, 0]])
    am = (ids > 0).long()
    lm = torch.tensor([[0.0, 1, 1], [1, 0, 0]])
    mb = pack_rows(ids, am, lm, torch.tensor([1, 0]))
    assert mb.input_ids.tolist() == [[8, 9, 5, 6, 7, 4]]
    assert mb.position_ids.tolist() == [[0, 1, 0, 1, 2, 3]]
    assert mb.cu_seqlens.tolist() == [0, 2, 6]
    # targets: row 1 col 0 (hidden 0 predicts 9); row 0 cols 1, 2 (hidden 3, 4)
    assert mb.hidden_index.tolist() == [0, 3, 4]
    assert mb.target_row.tolist() == [1, 0, 0] and mb.target_col.tolist() == [0, 1, 2]


def grads_after_step(engine, batch):
    """Run train_step but capture the accumulated gradients instead of stepping."""
    captured = {}

    def capture():
        for name, p in engine.model.named_parameters():
            captured[name] = p.grad.detach().clone()
            p.grad = None
        return 0.0

    engine.backend.step = capture
    stats = engine.train_step(batch)
    return stats, captured


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("policy_loss", ["ppo", "gspo"])
@pytest.mark.parametrize("packing", [True, False])
def test_microbatched_loss_and_grads_equal_one_big_batch(tiny_qwen2, aggregation, policy_loss, packing):
    groups = skewed_groups(seed=1)
    # make some behaviour weights exceed the cap so masking changes the counts
    for t in groups[0].trajectories:
        t.behaviour_logprobs[0] = -30.0
    adv = [[1.0, -0.5, 0.25], [-1.0, 0.5, 2.0], [0.3, -0.3, 0.0]]
    batch = build_batch(groups, adv, pad_token_id=0)
    temperature, max_new = 0.9, 16
    cfg = TrainerConfig(aggregation=aggregation, policy_loss=policy_loss, max_tokens_per_microbatch=20,
                        packing=packing, behaviour_weight_cap=5.0, behaviour_weight_mode="mask", grad_clip=0.0)
    engine = TrainEngine(tiny_qwen2, cfg, temperature=temperature, max_new_tokens=max_new)

    tiny_qwen2.eval()
    tiny_qwen2.zero_grad()
    logp = padded_reference_logprobs(tiny_qwen2, batch, temperature)
    fn = gspo_loss if policy_loss == "gspo" else decoupled_ppo_loss
    ref_loss, _ = fn(logp, logp.detach(), batch.behaviour_logprobs, batch.advantages, batch.loss_mask,
                     eps_clip_low=0.2, eps_clip_high=0.2, behaviour_weight_cap=5.0, behaviour_weight_mode="mask",
                     aggregation=aggregation, max_tokens_norm=float(max_new))
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in tiny_qwen2.named_parameters()}
    tiny_qwen2.zero_grad(set_to_none=True)

    stats, grads = grads_after_step(engine, batch)
    assert stats["train/behaviour_capped_fraction"] > 0
    assert stats["train/loss"] == pytest.approx(ref_loss.item(), abs=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prefix_mask_hand_example():
    # prefix of 2, continuations of 2 and 1 tokens: [p0 p1 a0 a1 b0]
    m = shared_prefix_mask(2, [2, 1]).int().tolist()
    assert m == [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 0],
                 [1, 1, 0, 0, 1]]  # b0 sees the prompt, not a0/a1


def test_pack_groups_layout_stores_the_prompt_once():
    # one group: prompt [5, 6], completions [7, 4] and [9]; a lone row [8, 3]
    ids = torch.tensor([[5, 6, 7, 4], [5, 6, 9, 0], [8, 3, 0, 0]])
    am = (ids > 0).long()
    lm = torch.tensor([[0.0, 1, 1], [0, 1, 0], [1, 0, 0]])
    mb = pack_groups(ids, am, lm, [torch.tensor([0, 1]), torch.tensor([2])])
    assert mb.input_ids.tolist() == [[5, 6, 7, 4, 9, 8, 3]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert mb.cu_seqlens.tolist() == [0, 5, 7]
    # row 0: hidden 1 (prompt end) predicts 7, hidden 2 predicts 4; row 1: hidden 1 predicts 9; row 2: hidden 5
    assert mb.hidden_index.tolist() == [1, 2, 1, 5]
    assert mb.target_row.tolist() == [0, 0, 1, 2] and mb.target_col.tolist() == [1, 2, 1, 0]
    assert mb.segment_masks[0].shape == (5, 5) and mb.segment_masks[1] is None


def test_shared_prompt_training_equals_unshared_with_fewer_tokens(tiny_qwen2):
    """Same pi_prox, loss and gradients (2 minibatches of whole groups), on fewer tokens."""
    groups = skewed_groups(seed=3, groups=4, n=4)
    batch = build_batch(groups, None, pad_token_id=0)
    results = {}
    for share in (True, False):
        cfg = TrainerConfig(minibatches=2, max_tokens_per_microbatch=40, grad_clip=0.0)
        engine = TrainEngine(copy.deepcopy(tiny_qwen2), cfg, temperature=0.8)
        if not share:  # the same whole-group minibatches, each sequence packed with its own prompt copy
            engine._microbatches = lambda b, rows: make_microbatches(
                b.input_ids, b.attention_mask, b.loss_mask, rows, cfg.max_tokens_per_microbatch)
        mbs = engine._microbatches(batch, torch.arange(batch.num_sequences))
        assert all((mb.segment_masks is not None) == share for mb in mbs)
        prox = engine.proximal_logprobs(batch)
        stats, grads = grads_after_step(engine, batch)
        results[share] = sum(mb.num_tokens for mb in mbs), prox, stats["train/loss"], grads
    shared, plain = results[True], results[False]
    prompts = sum(len(g.trajectories[0].prompt_ids) for g in groups)
    assert shared[0] <= plain[0] - prompts * 3  # each group's prompt stored once instead of 4 times
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=0)
    assert shared[2] == pytest.approx(plain[2], abs=1e-6)
    for name, g in plain[3].items():
        torch.testing.assert_close(shared[3][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prompt_layout_survives_gradient_checkpointing(tiny_qwen2):
    """Checkpointed layers re-run their forward in backward: the shared-prompt masks must reach it."""
    batch = build_batch(skewed_groups(seed=4, groups=3, n=4), None, pad_token_id=0)
    out = {}
    for ckpt in (False, True):
        engine = TrainEngine(copy.deepcopy(tiny_qwen2), TrainerConfig(grad_clip=0.0), temperature=1.0,
                             gradient_checkpointing=ckpt)
        stats, grads = grads_after_step(engine, batch)
        out[ckpt] = stats["train/loss"], grads
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, atol=1e-6, rtol=1e-4, msg=name)
