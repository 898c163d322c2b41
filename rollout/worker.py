"""A rollout worker: prompts in, rewarded groups out.

It owns a generation backend (the engine or HF `generate`) and a reward pool, and
knows nothing of the trainer: weights arrive through `update_weights`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from areal.rewards import RewardRequest
from areal.rollout.types import SamplingParams
from areal.trajectory import Group, Trajectory

_RESERVED = ("prompt", "completion")  # positional names of the reward signature


@dataclass
class Prompt:
    """A dataset row made ready to generate from."""

    index: int  # row index in its split
    text: str
    token_ids: list[int]
    fields: dict[str, Any]  # the row's other columns, passed to the reward


def reward_fields(row: dict[str, Any], prompt_key: str, answer_key: str) -> dict[str, Any]:
    fields = {k: v for k, v in row.items() if k != prompt_key and k not in _RESERVED}
    fields["answer"] = row[answer_key]  # the reward always sees the reference as `answer`
    return fields


class RolloutWorker:
    def __init__(self, backend, reward_pool, tokenizer):
        self.backend, self.reward_pool, self.tokenizer = backend, reward_pool, tokenizer
        self.reward_failures: dict[str, int] = {}

    def update_weights(self, version: int, named_tensors, mode: str = "keep") -> None:
        self.backend.update_weights(version, named_tensors, mode=mode)

    def rollout(self, prompts: list[Prompt], params: SamplingParams, first_group_id: int = 0) -> tuple[list[Group], dict[str, float]]:
        """Generate n samples per prompt, score them, and return whole groups plus timings."""
        t0 = time.perf_counter()
        outputs = self.backend.generate([p.token_ids for p in prompts], params)
        t1 = time.perf_counter()
        texts = self.tokenizer.batch_decode([o.token_ids for o in outputs], skip_special_tokens=True)
        requests = [
            RewardRequest(prompt=prompts[o.prompt_index].text, completion=text, fields=prompts[o.prompt_index].fields)
            for o, text in zip(outputs, texts)
        ]
        scored = self.reward_pool.score(requests)
        t2 = time.perf_counter()
        for kind, count in scored.failures.items():
            self.reward_failures[kind] = self.reward_failures.get(kind, 0) + count
        groups = []
        for g, prompt in enumerate(prompts):
            trajs = []
            for k in range(g * params.n, (g + 1) * params.n):
                o = outputs[k]
                trajs.append(
                    Trajectory(
                        prompt_ids=prompt.token_ids,
                        completion_ids=o.token_ids,
                        behaviour_logprobs=o.logprobs,
                        versions=o.versions,
                        reward=scored.rewards[k],
                        finish_reason=o.finish_reason,
                        prompt_text=prompt.text,
                        completion_text=texts[k],
                    )
                )
            groups.append(Group(group_id=first_group_id + g, trajectories=trajs, fields=prompt.fields))
        timings = {
            "time/generate_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "rollout/generated_tokens": sum(len(o.token_ids) for o in outputs),
            **{f"reward/failures_{kind}": count for kind, count in scored.failures.items()},
        }
        return groups, timings
