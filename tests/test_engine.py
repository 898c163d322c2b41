"""areal Engine: parity with HF generate, groups, preemption, log-probs, weight updates, streaming."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from areal.rollout import Engine, SamplingParams

torch.set_num_threads(1)

VOCAB = 48
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 2, 33]]
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.3,  # large weights: well-separated logits, so greedy argmax is not a numerical coin flip
    max_position_embeddings=256,
)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=6),
}


def make_model(family: str = "qwen2", seed: int = 0, eos: int | None = None):
    torch.manual_seed(seed)
    cfg = FAMILIES[family]()
    cfg.eos_token_id = eos
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = eos
    return model


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf_generate(family):
    model = make_model(family)
    # pick an eos the model actually emits for prompt 0, so stopping is exercised
    eos = hf_greedy(model, PROMPTS[0], 10)[3]
    model.generation_config.eos_token_id = eos
    model.config.eos_token_id = eos
    expected = [hf_greedy(model, p, 10, eos) for p in PROMPTS]
    assert len(expected[0]) <= 4 and expected[0][-1] == eos
    # small token budget: prompts are chunked and mixed with other sequences' decode steps
    engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=6)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    assert [o.token_ids for o in outs] == expected
    assert outs[0].finish_reason == "stop"
    for o in outs:
        assert len(o.token_ids) == len(o.logprobs) == len(o.versions)
    assert engine.stats()["kv_blocks_used"] == 0


def test_group_shares_prompt_and_gives_identical_greedy_samples():
    model = make_model("qwen2")
    engine = Engine(model, num_blocks=64, block_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0, max_new_tokens=6))
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i, p in enumerate(PROMPTS):
        expected = hf_greedy(model, p, 6)
        assert [o.token_ids for o in outs[3 * i : 3 * i + 3]] == [expected] * 3
    stats = engine.stats()
    assert stats["prefill_tokens_saved"] == 2 * sum(len(p) for p in PROMPTS)
    assert stats["prefill_tokens"] == sum(len(p) for p in PROMPTS)
    assert stats["kv_blocks_used"] == 0


def test_decode_buckets_split_by_length_and_by_gathered_bytes():
    from areal.rollout.model_runner import decode_buckets

    # tables of 1, 1, 2 blocks then 5 (more than twice the bucket's first): two runs by length alone
    assert decode_buckets([1, 1, 2, 5, 5], block_size=4, token_bytes=8, gather_bytes=1 << 20) == [(0, 3, 2), (3, 5, 5)]
    # 2 rows x 5 blocks x 4 tokens x 8 bytes = 320 bytes: a 300-byte budget holds one such row per run
    assert decode_buckets([5, 5, 5], block_size=4, token_bytes=8, gather_bytes=300) == [(0, 1, 5), (1, 2, 5), (2, 3, 5)]
    assert decode_buckets([], block_size=4, token_bytes=8) == []


def test_decode_split_into_small_gather_buckets_gives_the_same_tokens(monkeypatch):
    import areal.rollout.model_runner as runner

    model = make_model("qwen2")
    params = SamplingParams(n=3, temperature=0, max_new_tokens=10)
    expected = [o.token_ids for o in Engine(model, num_blocks=64, block_size=4).generate(PROMPTS, params)]
    seen = []
    real = runner.decode_buckets
    monkeypatch.setattr(runner, "decode_buckets", lambda *a: seen.append(real(*a, gather_bytes=1)) or seen[-1])
    outs = Engine(model, num_blocks=64, block_size=4).generate(PROMPTS, params)
    assert max(len(b) for b in seen) == 12  # every decode row attended in a run of its own
    assert [o.token_ids for o in outs] == expected


def test_preemption_with_tiny_pool_keeps_outputs_exact():
    model = make_model("llama")
    expected = [hf_greedy(model, p, 12) for p in PROMPTS]
    # 8 blocks x 4 slots = 32 tokens for 4 sequences of up to 23 tokens: must preempt
    engine = Engine(model, num_blocks=8, block_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=12))
    assert [o.token_ids for o in outs] == [e for e in expected for _ in range(2)]
    assert engine.stats()["preemptions"] > 0
    assert engine.stats()["kv_blocks_used"] == 0


def test_sampled_logprobs_match_full_forward():
    model = make_model("qwen3")
    engine = Engine(model, num_blocks=64, block_size=4)
    temp = 0.7
    outs = engine.generate(PROMPTS, SamplingParams(n=3, temperature=temp, max_new_tokens=8, seed=1))
    for o in outs:
        seq = PROMPTS[o.prompt_index] + o.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(PROMPTS[o.prompt_index]) - 1 : -1]
        ref = torch.log_softmax(logits / temp, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4), (o.logprobs, ref)
    # sampling differs across the group's samples (not n copies of one sample)
    assert len({tuple(o.token_ids) for o in outs[:3]}) > 1


def test_greedy_logprob_is_plain_softmax_and_topk_restricts_support():
    model = make_model("qwen2")
    engine = Engine(model, num_blocks=64, block_size=4)
    p = PROMPTS[0]
    out = engine.generate([p], SamplingParams(temperature=0, max_new_tokens=1))[0]
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[0, -1]
    assert out.token_ids[0] == int(logits.argmax())
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-5)
    outs = engine.generate([p], SamplingParams(n=16, temperature=2.0, top_k=2, max_new_tokens=1, seed=3))
    top2 = logits.topk(2).indices.tolist()
    assert {o.token_ids[0] for o in outs} <= set(top2)
    renorm = torch.log_softmax(logits[top2] / 2.0, -1)
    for o in outs:
        assert o.logprobs[0] == pytest.approx(float(renorm[top2.index(o.token_ids[0])]), abs=1e-5)


def test_seed_reproduces_samples_regardless_of_batch():
    model = make_model("qwen2")
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=123)
    a = Engine(model, num_blocks=64, block_size=4).generate(PROMPTS, params)
    b = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=5).generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = Engine(model, num_blocks=64, block_size=4).generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=124))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def _perturbed_weights(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return {name: p.detach() + 0.3 * torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def test_recompute_update_continues_like_fresh_engine_with_new_weights():
    model = make_model("qwen2")
    engine = Engine(model, num_blocks=64, block_size=4)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params, prompt_index=i)
    done = {}
    for _ in range(4):
        for rid, out in engine.step():
            done[rid] = out
    assert not done  # all in flight
    new = _perturbed_weights(model)
    engine.begin_update(1)
    engine.load_bucket(list(new.items())[:5])
    engine.load_bucket(list(new.items())[5:])
    engine.finish_update(1, mode="recompute")
    while engine.has_unfinished():
        for rid, out in engine.step():
            done[rid] = out
    new_model = make_model("qwen2")
    new_model.load_state_dict(new, strict=False)
    for rid, out in done.items():
        k = out.versions.count(0)
        assert 0 < k < 10 and out.versions == [0] * k + [1] * (10 - k)
        prompt = PROMPTS[out.prompt_index]
        assert out.token_ids[:k] == hf_greedy(model, prompt, k)
        fresh = Engine(new_model, num_blocks=64, block_size=4)
        cont = fresh.generate([prompt + out.token_ids[:k]], SamplingParams(temperature=0, max_new_tokens=10 - k))[0]
        assert out.token_ids[k:] == cont.token_ids


def test_keep_update_records_both_versions():
    model = make_model("qwen2")
    engine = Engine(model, num_blocks=64, block_size=4)
    rid = engine.add_request(PROMPTS[0], SamplingParams(n=2, temperature=0, max_new_tokens=8))
    for _ in range(3):
        assert engine.step() == []
    engine.update_weights(5, _perturbed_weights(model), mode="keep")
    outs = []
    while engine.has_unfinished():
        outs += [o for r, o in engine.step() if r == rid]
    assert len(outs) == 2
    for o in outs:
        assert o.versions[0] == 0 and o.versions[-1] == 5 and len(o.versions) == 8


def test_streaming_returns_early_finishers_and_abort():
    model = make_model("qwen2")
    engine = Engine(model, num_blocks=64, block_size=4)
    seen = []
    short = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=2, temperature=0), on_finish=lambda r, o: seen.append(r))
    long = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30, temperature=0), on_finish=lambda r, o: seen.append(r))
    doomed = engine.add_request(PROMPTS[2], SamplingParams(n=2, max_new_tokens=30, temperature=0))
    steps = 0
    while short not in seen:
        engine.step()
        steps += 1
    assert steps == 2 and engine.stats()["running"] == 3  # long + 2 samples of doomed still running
    aborted = engine.abort(doomed)
    assert [o.finish_reason for o in aborted] == ["abort", "abort"] and len(aborted[0].token_ids) == 2
    assert engine.stats()["running"] == 1
    while engine.has_unfinished():
        engine.step()
    assert seen == [short, long]
    assert engine.stats()["kv_blocks_used"] == 0


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_token_ids_and_stop_strings():
    model = make_model("qwen2")
    free = hf_greedy(model, PROMPTS[0], 8)
    engine = Engine(model, num_blocks=64, block_size=4, tokenizer=CharTokenizer())
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[free[2]]))[0]
    assert out.token_ids == free[: free.index(free[2]) + 1] and out.finish_reason == "stop"
    stop = CharTokenizer().decode(free[3:5])
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=8, stop=[stop]))[0]
    assert CharTokenizer().decode(out.token_ids).endswith(stop) and out.finish_reason == "stop"
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, num_blocks=8, block_size=4).add_request([1, 2], SamplingParams(stop=["x"]))


def test_unsupported_model_type_is_named():
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="gpt2"):
        Engine(AutoModelForCausalLM.from_config(cfg), num_blocks=4, block_size=4)


def test_recompute_update_reshares_group_prompt_blocks():
    model = make_model("qwen2")
    prompt = list(range(3, 14))  # 11 tokens: 2 full blocks of 4 shareable on re-prefill
    engine = Engine(model, num_blocks=64, block_size=4)
    engine.add_request(prompt, SamplingParams(n=3, temperature=0, max_new_tokens=6))
    for _ in range(3):
        engine.step()
    saved_before = engine.stats()["prefill_tokens_saved"]
    engine.update_weights(1, _perturbed_weights(model), mode="recompute")
    outs = []
    while engine.has_unfinished():
        outs += [o for _, o in engine.step()]
    assert engine.stats()["prefill_tokens_saved"] - saved_before == 2 * 8  # 2 samples x 2 full blocks
    assert len({tuple(o.token_ids) for o in outs}) == 1 and outs[0].versions == [0, 0, 0, 1, 1, 1]
    new_model = make_model("qwen2")
    new_model.load_state_dict(_perturbed_weights(model), strict=False)
    cont = Engine(new_model, num_blocks=64, block_size=4).generate(
        [prompt + outs[0].token_ids[:3]], SamplingParams(temperature=0, max_new_tokens=3))[0]
    assert outs[0].token_ids[3:] == cont.token_ids


def test_asyncio_api_streams_and_tied_weight_alias_loads():
    import asyncio

    model = make_model("qwen2")
    engine = Engine(model, num_blocks=64, block_size=4)
    order = []

    async def one(prompt, max_new):
        outs = await engine.agenerate(prompt, SamplingParams(n=2, temperature=0, max_new_tokens=max_new))
        order.append(max_new)
        return outs

    async def main():
        return await asyncio.gather(one(PROMPTS[0], 9), one(PROMPTS[1], 2))

    long, short = asyncio.run(main())
    assert order == [2, 9] and [len(o.token_ids) for o in long + short] == [9, 9, 2, 2]
    assert long[0].token_ids == hf_greedy(model, PROMPTS[0], 9)
    # tied embeddings: the lm_head name reaches the shared tensor
    emb = model.get_input_embeddings().weight
    engine.runner.load_weights([("lm_head.weight", torch.zeros_like(emb))])
    assert engine.runner.model.get_input_embeddings().weight.abs().sum() == 0


def test_pool_smaller_than_request_finishes_with_length_instead_of_crashing():
    model = make_model("qwen2")
    engine = Engine(model, num_blocks=4, block_size=4)  # 16 slots in all
    outs = engine.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(n=2, temperature=0, max_new_tokens=40))
    assert [len(o.token_ids) for o in outs] == [16 - 7] * 2 + [16 - 2] * 2
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[0].token_ids == hf_greedy(model, PROMPTS[0], 9)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["preemptions"] > 0
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(16)), SamplingParams())


@pytest.mark.parametrize("seeded", [False, True])
def test_sampler_frequencies_follow_tempered_softmax(seeded):
    from areal.rollout.sampler import SamplingBatch, sample

    torch.manual_seed(0)
    rows = 20000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(rows, 1)
    seeds = list(range(rows)) if seeded else [0] * rows
    batch = SamplingBatch([0.7] * rows, [0] * rows, [1.0] * rows, seeds, [0] * rows, [0] * rows, any_seeded=seeded)
    tokens, logprobs = sample(logits, batch)
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / rows, expected, atol=0.015)  # ~5 sigma
    assert torch.allclose(logprobs, expected.log()[tokens], atol=1e-5)


def test_onednn_prepacked_linears_match_and_follow_weight_updates(monkeypatch):
    import areal.rollout.model_runner as mr

    monkeypatch.setattr(mr, "PREPACK_MIN_WEIGHT", 0)  # pack every linear, even in this tiny model
    model = make_model("llama")
    engine = Engine(model, num_blocks=64, block_size=4)
    if not engine.runner._packed:
        pytest.skip("oneDNN linear prepacking unavailable in this torch build")
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 6) for p in PROMPTS]
    new = _perturbed_weights(model)
    engine.update_weights(1, new, mode="recompute")
    new_model = make_model("llama")
    new_model.load_state_dict(new, strict=False)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    assert [o.token_ids for o in outs] == [hf_greedy(new_model, p, 6) for p in PROMPTS]


# ---------------------------------------------------------------- resume (in-flight state of a checkpoint)
RESUME_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 11 tokens
# n=4 at temperature 1, seeded; the stop ids make the samples end at different steps (lengths 12, 12, 2, 10)
RESUME_PARAMS = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=0, stop_token_ids=[3, 4, 5])


def _drain(engine, outs: dict) -> None:
    while engine.has_unfinished():
        engine.step()
    assert not engine.requests and engine.stats()["kv_blocks_used"] == 0


def _assert_same_samples(got: dict, expected: list) -> None:
    assert sorted(got) == [o.sample_index for o in expected]
    for e in expected:
        o = got[e.sample_index]
        assert o.token_ids == e.token_ids and o.versions == e.versions and o.finish_reason == e.finish_reason
        assert o.logprobs == pytest.approx(e.logprobs, abs=1e-5)


def _interrupted_then_resumed(model, steps: int, prompt=RESUME_PROMPT, params=RESUME_PARAMS, **engine_kw):
    """Step a group `steps` times, snapshot it, continue it on a FRESH engine; returns (union, partial, finished)."""
    first = Engine(model, num_blocks=64, block_size=4, **engine_kw)
    finished: dict = {}
    rid = first.add_request(prompt, params, on_finish=lambda _r, o: finished.setdefault(o.sample_index, o))
    for _ in range(steps):
        first.step()
    partial = first.unfinished(rid)
    before = dict(finished)
    assert sorted([p.sample_index for p in partial] + list(before)) == list(range(params.n))
    second = Engine(model, num_blocks=64, block_size=4)
    resumed: dict = {}
    rid2 = second.add_request(prompt, params, on_finish=lambda _r, o: resumed.setdefault(o.sample_index, o),
                              resume=partial)
    _drain(second, resumed)
    assert second.unfinished(rid2) == []
    _drain(first, finished)  # the snapshot disturbed nothing: the first engine still finishes the group
    return {**before, **resumed}, partial, before, finished


def test_resume_continues_a_seeded_group_exactly(tiny_qwen2):
    expected = Engine(tiny_qwen2, num_blocks=64, block_size=4).generate([RESUME_PROMPT], RESUME_PARAMS)
    union, partial, before, first = _interrupted_then_resumed(tiny_qwen2, steps=5)
    # mid-generation: one sample finished (2 tokens), the three others carry 5 tokens each
    assert sorted(before) == [2] and [len(p.token_ids) for p in partial] == [5, 5, 5]
    assert all(len(p.logprobs) == len(p.versions) == 5 for p in partial)
    _assert_same_samples(union, expected)
    _assert_same_samples(first, expected)


def test_resume_of_a_group_whose_leader_has_not_forked(tiny_qwen2):
    expected = Engine(tiny_qwen2, num_blocks=64, block_size=4).generate([RESUME_PROMPT], RESUME_PARAMS)
    # a 4-token budget: after one step the 11-token prompt is still prefilling, nothing forked
    union, partial, before, _ = _interrupted_then_resumed(tiny_qwen2, steps=1, max_num_batched_tokens=4)
    assert not before and [(p.sample_index, p.token_ids) for p in partial] == [(i, []) for i in range(4)]
    _assert_same_samples(union, expected)


def test_resume_with_finished_samples_and_an_empty_one_and_unknown_requests(tiny_qwen2):
    from areal.rollout.types import PartialSample

    prompt = RESUME_PROMPT[:8]  # two whole blocks of 4: an empty resumed sample must still compute its last token
    expected = Engine(tiny_qwen2, num_blocks=64, block_size=4).generate([prompt], RESUME_PARAMS)
    engine = Engine(tiny_qwen2, num_blocks=64, block_size=4)
    assert engine.unfinished(12345) == []
    e0 = expected[0]
    # sample 3 has no token yet: it adopts the prompt blocks sample 0 computes, all but the last token's
    resume = [PartialSample(3), PartialSample(0, e0.token_ids[:4], e0.logprobs[:4], e0.versions[:4])]
    got: dict = {}
    rid = engine.add_request(prompt, RESUME_PARAMS, on_finish=lambda _r, o: got.setdefault(o.sample_index, o),
                             resume=resume)
    assert [(p.sample_index, len(p.token_ids)) for p in engine.unfinished(rid)] == [(0, 4), (3, 0)]
    _drain(engine, got)  # only k=2 of n=4 samples ran, and the request still popped
    assert engine.unfinished(rid) == [] and rid not in engine.requests
    assert engine.stats()["prefill_tokens_saved"] == 4
    _assert_same_samples(got, [expected[0], expected[3]])
    with pytest.raises(ValueError, match="sample indices"):
        engine.add_request(prompt, RESUME_PARAMS, resume=[PartialSample(4)])
    with pytest.raises(ValueError, match="sample indices"):
        engine.add_request(prompt, RESUME_PARAMS, resume=[PartialSample(1), PartialSample(1)])
    assert PartialSample.from_dict(resume[1].to_dict()) == resume[1]
