"""The HF generate backend returns exact behaviour log-probs, prompt-major, trimmed at EOS."""

import torch

from areal.rollout.hf_backend import HFGenerateBackend
from areal.rollout.types import SamplingParams

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]


def full_forward_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_sampled_logprobs_match_a_full_forward(tiny_qwen2):
    backend = HFGenerateBackend(tiny_qwen2, eos_token_ids=[1], pad_token_id=0)
    outs = backend.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, temperature=0.7, seed=0))
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for o in outs:
        assert len(o.token_ids) == len(o.logprobs) == len(o.versions) >= 1
        expected = full_forward_logprobs(tiny_qwen2, PROMPTS[o.prompt_index], o.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(o.logprobs), expected, atol=1e-4, rtol=0)


def test_greedy_matches_argmax_and_stops_at_eos(tiny_qwen2):
    backend = HFGenerateBackend(tiny_qwen2, eos_token_ids=[1], pad_token_id=0)
    (out,) = backend.generate([PROMPTS[1]], SamplingParams(n=1, max_new_tokens=5, temperature=0.0))
    ids = list(PROMPTS[1])
    for tok in out.token_ids:
        with torch.no_grad():
            assert tok == int(tiny_qwen2(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(tok)
    assert out.finish_reason == ("stop" if out.token_ids[-1] == 1 else "length")
    assert 1 not in out.token_ids[:-1]


def test_stop_token_ids_cut_the_completion(tiny_qwen2):
    backend = HFGenerateBackend(tiny_qwen2, eos_token_ids=[1], pad_token_id=0)
    outs = backend.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, temperature=1.5, seed=1,
                                                    stop_token_ids=list(range(3, 40, 2))))
    for o in outs:
        stops = [i for i, t in enumerate(o.token_ids) if t % 2 == 1 and t >= 3 or t == 1]
        assert not stops or stops[0] == len(o.token_ids) - 1 and o.finish_reason == "stop"


def test_seed_reproduces_and_update_weights_sets_versions(tiny_qwen2):
    backend = HFGenerateBackend(tiny_qwen2, eos_token_ids=[1], pad_token_id=0)
    params = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=123)
    a, b = backend.generate(PROMPTS, params), backend.generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    new = {n: p.detach() + 0.01 for n, p in tiny_qwen2.named_parameters()}
    backend.update_weights(3, new.items())
    out = backend.generate(PROMPTS, params)
    assert all(v == 3 for o in out for v in o.versions)
    for name, p in tiny_qwen2.named_parameters():
        torch.testing.assert_close(p.detach(), new[name])
