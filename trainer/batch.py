"""Turning whole groups into the padded tensors the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from areal.trajectory import Group


@dataclass
class TrainBatch:
    """Right-padded sequences; token tensors are aligned with `labels` ([S, T-1]).

    Position t of the target tensors holds token t+1 of the sequence, predicted from
    hidden state t; `loss_mask` is 1 on completion tokens only.
    """

    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    labels: torch.Tensor  # [S, T-1]
    loss_mask: torch.Tensor  # [S, T-1] float
    behaviour_logprobs: torch.Tensor  # [S, T-1]
    versions: torch.Tensor  # [S, T-1] long, -1 outside completions
    advantages: torch.Tensor | None  # [S, T-1]; None: the engine computes them (trainer.advantage)
    rewards: torch.Tensor | None = None  # [S] scalar reward per sequence
    group_index: torch.Tensor | None = None  # [S] long: which group (prompt) each sequence belongs to

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "TrainBatch":
        return TrainBatch(**{f.name: _apply(getattr(self, f.name), lambda x: x[index]) for f in fields(self)})

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(**{f.name: _apply(getattr(self, f.name), lambda x: x.to(device)) for f in fields(self)})


def _apply(value, fn):
    return None if value is None else fn(value)


def build_batch(groups: list[Group], advantages: list[list[float]] | None, pad_token_id: int) -> TrainBatch:
    """`advantages[g][k]` is the scalar advantage of sample k of group g, broadcast to its tokens.

    advantages=None leaves them to the engine (`trainer.advantage`, KL-in-reward, overlong
    penalty); the batch always carries the rewards and group index for that.
    """
    trajs = [(t, advantages[g][k] if advantages is not None else 0.0)
             for g, group in enumerate(groups) for k, t in enumerate(group.trajectories)]
    width = max(t.num_tokens for t, _ in trajs)
    S = len(trajs)
    input_ids = torch.full((S, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((S, width), dtype=torch.long)
    loss_mask = torch.zeros((S, width - 1))
    behaviour = torch.zeros((S, width - 1))
    versions = torch.full((S, width - 1), -1, dtype=torch.long)
    adv = torch.zeros((S, width - 1))
    for row, (t, a) in enumerate(trajs):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        input_ids[row, : p + c] = torch.tensor(t.prompt_ids + t.completion_ids)
        attention_mask[row, : p + c] = 1
        span = slice(p - 1, p - 1 + c)  # targets of the completion tokens
        loss_mask[row, span] = 1.0
        behaviour[row, span] = torch.tensor(t.behaviour_logprobs)
        versions[row, span] = torch.tensor(t.versions)
        adv[row, span] = a
    rewards = torch.tensor([t.reward for t, _ in trajs], dtype=torch.float32)
    group_index = torch.tensor([g for g, group in enumerate(groups) for _ in group.trajectories], dtype=torch.long)
    return TrainBatch(input_ids, attention_mask, input_ids[:, 1:].clone(), loss_mask, behaviour, versions,
                      adv if advantages is not None else None, rewards, group_index)
