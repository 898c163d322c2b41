"""Packed micro-batches: bin packing, packed == unpacked log-probs, loss and gradients."""

import copy

import pytest
import torch

from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine
from areal.trainer.loss import decoupled_ppo_loss, gspo_loss
from areal.trainer.packing import (PADDING_SLACK, SMALL_CALL, attention_layout, balanced_partition, bucket_blocks, make_microbatches,
                                  pack_groups, pack_rows, split_balanced)
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


def dense_allowed(layout, n):
    """[n, n] 0/1: which packed positions each position's query attends to, read back from the layout's calls."""
    allowed = torch.zeros(n, n, dtype=torch.int)
    for call in layout.calls:
        q, k = call.query_index.shape[1], call.key_index.shape[1]
        mask = call.mask[:, 0] if call.mask is not None else torch.ones(q, k, dtype=torch.bool).tril().expand(len(call.valid), q, k)
        for b in range(len(call.valid)):
            for i in range(q):
                if call.valid[b, i]:
                    for j in range(k):
                        if mask[b, i, j]:
                            allowed[call.query_index[b, i], call.key_index[b, j]] = 1
    return allowed.tolist()


def test_attention_layout_hand_example():
    # a group: prefix of 2, completions of 2 and 1 tokens [p0 p1 a0 a1 b0]; then a lone sequence [c0 c1]
    layout = attention_layout([(0, 2, [2, 1]), (5, 2, [])])
    assert dense_allowed(layout, 7) == [[1, 0, 0, 0, 0, 0, 0],
                                        [1, 1, 0, 0, 0, 0, 0],
                                        [1, 1, 1, 0, 0, 0, 0],
                                        [1, 1, 1, 1, 0, 0, 0],
                                        [1, 1, 0, 0, 1, 0, 0],  # b0 sees the prompt, not a0/a1
                                        [0, 0, 0, 0, 0, 1, 0],
                                        [0, 0, 0, 0, 0, 1, 1]]
    assert len(layout.calls) == 2  # the causal blocks (prompt, lone sequence) together, the completions together
    rows = torch.cat([call.query_index[call.valid] for call in layout.calls])
    assert rows[layout.restore].tolist() == list(range(7))  # every position's output comes back to its place


def test_a_long_group_costs_its_completions_scores_not_the_square_of_the_group():
    """16 completions of 150-250 tokens after a 10-token prompt: the calls' scores stay within the padding
    slack of sum C_k (P + C_k); one mask over the whole group would be (P + sum C_k)^2, 8 times more."""
    owns = [150, 250, 200, 180, 220, 160, 240, 190] * 2
    layout = attention_layout([(0, 10, owns)])
    scores = sum(call.query_index.numel() * call.key_index.shape[1] for call in layout.calls)
    own = 10 * 10 + sum(c * (10 + c) for c in owns)
    assert own <= scores <= PADDING_SLACK * own
    assert (10 + sum(owns)) ** 2 > 8 * scores


def test_a_group_without_a_common_prefix_is_plain_causal_sequences():
    layout = attention_layout([(0, 0, [2, 1])])
    assert dense_allowed(layout, 3) == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_bucket_blocks_pads_similar_blocks_together_and_long_ones_apart():
    assert bucket_blocks([(3, 3), (2, 2), (1, 1)]) == [[0, 1, 2]]  # a small call: padding is cheaper than a call
    big = 2 * int(SMALL_CALL ** 0.5)  # 256: a call of one such block is over SMALL_CALL
    # padded to 256 x 256, a bucket may compute at most twice its blocks' own scores:
    # 2 blocks (256, 64): 2 * 256^2 <= 2 * (256^2 + 64^2); a third 64 would pad 3 * 256^2 > 2 * (256^2 + 2 * 64^2)
    assert bucket_blocks([(big, big)] + [(big // 4, big // 4)] * 4) == [[0, 1], [2, 3, 4]]
    # halves: 3 * 256^2 = 2 * (256^2 + 2 * 128^2) still fits, a fourth block does not
    assert bucket_blocks([(big // 2, big // 2)] * 3 + [(big, big)]) == [[3, 0, 1], [2]]


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
    assert dense_allowed(mb.attention, 7)[4] == [1, 1, 0, 0, 1, 0, 0]  # row 1's completion: the prompt and itself
    assert dense_allowed(mb.attention, 7)[6] == [0, 0, 0, 0, 0, 1, 1]  # the lone row: itself only


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
