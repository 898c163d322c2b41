"""Advantage estimators and reward shaping: GRPO / Dr.GRPO / RLOO, REINFORCE++, GAE, DAPO.

Pure tensor functions; shapes are in each docstring. Per-token tensors are [B, T] with a
mask whose valid tokens are contiguous within each row (left or right padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: Tensor, method: str = "grpo", eps: float = 1e-6, *, unbiased_std: bool = False) -> Tensor:
    """Per-sample advantages of G groups of n samples, rewards [G, n] -> [G, n].

        grpo:     (r_i − mean) / (std + eps)
        dr_grpo:  r_i − mean                            (Dr.GRPO drops the std)
        rloo:     r_i − mean_{j≠i} r_j = n/(n−1) · (r_i − mean)

    std is the population std (divide by n) by default: it is defined for n = 1 and an
    all-equal group gives exactly 0, never NaN. `unbiased_std=True` divides by n − 1 (what
    torch.std, TRL and verl use); that only rescales GRPO advantages by sqrt(n/(n−1)), and
    n = 1 then uses std 0. RLOO with n = 1 has no leave-one-out baseline: the advantage is
    0 (no learning signal) rather than the raw reward.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got {tuple(rewards.shape)}")
    if method not in GROUP_METHODS:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    n = r.shape[1]
    centred = r - r.mean(dim=1, keepdim=True)
    if method == "dr_grpo":
        return centred
    if method == "rloo":
        return centred * (n / (n - 1)) if n > 1 else torch.zeros_like(r)
    if unbiased_std and n > 1:
        std = r.std(dim=1, keepdim=True, correction=1)
    else:
        std = r.std(dim=1, keepdim=True, correction=0)
    return centred / (std + eps)


def broadcast_to_tokens(sequence_values: Tensor, mask: Tensor) -> Tensor:
    """Give every valid token of sequence b the value sequence_values[b]: [B] -> [B, T]."""
    return sequence_values.reshape(-1, 1).to(torch.float32) * mask.to(torch.float32)


def _last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid token of each row [B] (rows must have one)."""
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{k≥t, valid} γ^(k−t) r_k within each row; 0 on invalid tokens. [B, T]."""
    m = mask.to(token_rewards.dtype)
    r = token_rewards * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = (r[:, t] + gamma * running) * m[:, t]  # padding resets the running return
        out[:, t] = running
    return out * m


def reinforce_plus_plus_advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """REINFORCE++: token returns with an optional per-token KL penalty, normalised over the batch.

    rewards [B] scalar reward per sequence, mask [B, T], kl [B, T] per-token KL estimate
    (e.g. `trainer.loss.kl_penalty`). Token reward: r_t = −kl_coef · kl_t, plus the
    sequence reward on its last valid token. G_t = Σ_{k≥t} γ^(k−t) r_k, and
        A_t = (G_t − mean(G)) / (std(G) + eps)
    with mean and (population) std over all valid tokens of the whole batch. [B, T].
    """
    m = mask.to(torch.float32)
    token_rewards = torch.zeros_like(m)
    if kl is not None and kl_coef != 0.0:
        token_rewards = token_rewards - kl_coef * kl.detach().to(torch.float32)
    has_tokens = m.sum(dim=1) > 0
    rows = torch.arange(m.shape[0], device=m.device)[has_tokens]
    last = _last_valid_index(m)[has_tokens]
    token_rewards[rows, last] += rewards.to(torch.float32)[has_tokens]
    returns = discounted_returns(token_rewards, m, gamma)
    count = m.sum().clamp(min=1.0)
    mean = (returns * m).sum() / count
    var = (((returns - mean) * m) ** 2).sum() / count
    return (returns - mean) / (var.sqrt() + eps) * m


def gae_advantages(
    rewards_per_token: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's valid tokens. Returns (A, returns).

        δ_t = r_t + γ V_{t+1} − V_t      (V after the last valid token is 0: terminal)
        A_t = δ_t + γ λ A_{t+1},   returns_t = A_t + V_t
    Both outputs are 0 on invalid tokens and carry no gradient (values are detached).
    """
    m = mask.to(torch.float32)
    r = rewards_per_token.detach().to(torch.float32) * m
    v = values.detach().to(torch.float32) * m
    b, t_len = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(b, device=r.device)
    next_adv = torch.zeros(b, device=r.device)
    for t in range(t_len - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        # an invalid position passes nothing back to the token before it
        next_value = v[:, t] * m[:, t]
        next_adv = a * m[:, t]
    return adv, (adv + v) * m


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward. lengths [B] (generated tokens).

        0                                      if |y| ≤ L_max − L_buffer
        ((L_max − L_buffer) − |y|) / L_buffer  if L_max − L_buffer < |y| ≤ L_max
        −1                                     if |y| > L_max
    times penalty_factor; so the penalty ramps linearly from 0 to −1 across the buffer.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError("need 0 < buffer_len <= max_len")
    y = lengths.to(torch.float32)
    threshold = float(max_len - buffer_len)
    ramp = (threshold - y) / float(buffer_len)
    penalty = torch.where(y <= threshold, torch.zeros_like(y), ramp)
    penalty = torch.where(y > max_len, torch.full_like(y, -1.0), penalty)
    return penalty * penalty_factor


def filter_uniform_groups(rewards: Tensor, atol: float = 0.0) -> Tensor:
    """Dynamic filtering (DAPO): True for groups [G, n] whose rewards are not all equal.

    A group whose rewards all agree (within atol) has zero group advantage, so it only
    dilutes the batch; callers drop the False groups (and do not count them as accepted).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got {tuple(rewards.shape)}")
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


def grouped_advantages(rewards: Tensor, group_index: Tensor, method: str = "grpo") -> Tensor:
    """`group_advantages` for sequences listed flat: rewards [S], group_index [S] -> [S].

    Groups may differ in size (e.g. after per-sample filtering); each is normalised alone.
    """
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(group_index).tolist():
        idx = torch.nonzero(group_index == g, as_tuple=True)[0]
        out[idx] = group_advantages(rewards[idx].reshape(1, -1), method=method).reshape(-1)
    return out
