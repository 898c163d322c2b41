"""The record that flows rollout -> buffer -> trainer.

A `Trajectory` is one sampled completion of one prompt; a `Group` is the n
completions of one prompt (a GRPO group). Groups stay whole from generation
to the loss, so group-normalised advantages are always well defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # log pi_behav(token), under the sampling distribution
    versions: list[int]  # policy version that produced each completion token
    reward: float = 0.0
    finish_reason: str = "length"  # "stop" (EOS / stop token) or "length" (max_new_tokens)
    prompt_text: str = ""
    completion_text: str = ""

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if len(self.behaviour_logprobs) != n or len(self.versions) != n:
            raise ValueError(
                f"trajectory has {n} completion tokens but {len(self.behaviour_logprobs)} "
                f"log-probs and {len(self.versions)} versions"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class Group:
    """All samples of one prompt, plus the prompt's dataset row (`fields`)."""

    group_id: int
    trajectories: list[Trajectory]
    fields: dict[str, Any] = field(default_factory=dict)
    reward_failures: dict[str, int] = field(default_factory=dict)  # kind -> samples scored 0 for it
    prompt_index: int = -1  # the prompt's row in the training data (the sample id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (checkpoints keep finished groups in their state)."""
        return {"group_id": self.group_id, "trajectories": [vars(t) for t in self.trajectories],
                "fields": self.fields, "reward_failures": self.reward_failures, "prompt_index": self.prompt_index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        return cls(d["group_id"], [Trajectory(**t) for t in d["trajectories"]], d["fields"], d["reward_failures"],
                   d["prompt_index"])

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @property
    def oldest_version(self) -> int:
        """Smallest policy version among the group's generated tokens (-1 if none)."""
        versions = [v for t in self.trajectories for v in t.versions]
        return min(versions) if versions else -1
