"""Held-out evaluation: greedy completions scored by the run's reward."""

from __future__ import annotations

import time

from areal.rewards import RewardRequest
from areal.rollout.types import SamplingParams

CORRECT_ABOVE = 0.5  # a sample is correct when its reward exceeds this (math reward: 1 or 0)


def eval_params(max_new_tokens: int, stop_token_ids=()) -> SamplingParams:
    """Greedy, one sample per prompt."""
    return SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=list(stop_token_ids))


def evaluate(backend, reward_pool, tokenizer, prompts, max_new_tokens: int, stop_token_ids=()) -> dict[str, float]:
    """Generate greedily (blocking) and score."""
    t0 = time.perf_counter()
    outputs = backend.generate([p.token_ids for p in prompts], eval_params(max_new_tokens, stop_token_ids))
    return score(reward_pool, tokenizer, prompts, outputs, t0)


def score(reward_pool, tokenizer, prompts, outputs, started: float) -> dict[str, float]:
    """The eval/* metrics of greedy `outputs` (one per prompt, in order); seconds since `started`."""
    texts = tokenizer.batch_decode([o.token_ids for o in outputs], skip_special_tokens=True)
    result = reward_pool.score(
        [RewardRequest(prompt=p.text, completion=t, fields=p.fields) for p, t in zip(prompts, texts)]
    )
    correct = sum(r > CORRECT_ABOVE for r in result.rewards)
    return {
        "eval/num_prompts": len(prompts),
        "eval/accuracy": correct / max(1, len(prompts)),
        "eval/reward_mean": sum(result.rewards) / max(1, len(prompts)),
        "eval/response_length": sum(len(o.token_ids) for o in outputs) / max(1, len(outputs)),
        "eval/seconds": time.perf_counter() - started,
    }


def merge_eval_results(parts: list[dict[str, float]]) -> dict[str, float]:
    """Shards of one evaluation (one per rollout worker) -> the whole: means weighted by prompt
    count, seconds = the slowest shard (they run in parallel), other keys from the first shard."""
    total = sum(p["eval/num_prompts"] for p in parts)
    merged = {k: v for k, v in parts[0].items() if k != "eval/shard"}
    for key in ("eval/accuracy", "eval/reward_mean", "eval/response_length"):
        merged[key] = sum(p[key] * p["eval/num_prompts"] for p in parts) / max(1, total)
    merged["eval/num_prompts"] = total
    merged["eval/seconds"] = max(p["eval/seconds"] for p in parts)
    return merged
