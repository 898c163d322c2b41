"""Policy losses: decoupled (staleness-aware) PPO, GSPO, KL penalties, entropy bonus.

Pure tensor functions. Every per-token tensor has the same shape: [B, T] (padded; a row
is a sequence) or packed [N] with `sequence_ids` [N] naming each token's sequence (needed
only for the sequence-level aggregations and GSPO). `mask` marks the tokens that count.
Each loss returns (loss, stats) where stats are detached scalar tensors.

Decoupled PPO (three policies: θ being optimised, prox = trainer weights at the start of
the step, behav = whatever sampled each token):

    u_t = exp(logπθ − logπprox)                    PPO ratio, clipped around π_prox
    w_t = exp(logπprox − logπbehav)   (detached)   behaviour importance weight
    L_t = −w_t · min(u_t A_t, clip(u_t, 1−ε_low, 1+ε_high) A_t)

Behaviour cap C (`behaviour_weight_cap`, None disables):
    "truncate": w_t ← min(w_t, C)
    "mask":     tokens with w_t > C leave the mask (as if padding: they drop out of every
                numerator and denominator below, and a sequence left with no tokens drops
                out of the sequence means)
Dual clip c > 1 (`dual_clip`, Ye et al. 2020), applied to the PPO term before w:
    for A_t < 0:  min(u A, clip(u) A) ← max(min(u A, clip(u) A), c A), i.e.
    L_t = w_t · min(−min(u A, clip(u) A), c |A_t|)  =  min(L_t, c |A_t| w_t)   (w ≥ 0)
With prox == behav (w = 1) this is exactly standard clipped PPO.

π_prox without its forward pass (A-3PO, `loglinear_proximal`): each token's behaviour version v_b,
the trainer at version v (π_prox) taking the step to v + 1 (π_θ), interpolate in log space

    α_t = (v − v_b) / (v + 1 − v_b)                 0 for fresh tokens (v_b = v), → 1 as they age
    logπprox ≈ logπbehav + α_t (logπθ − logπbehav)   with logπθ detached

Aggregation of L_t over the valid tokens (m_t = 1):
    "token-mean":              Σ_t m L / Σ_t m
    "seq-mean-token-mean":     mean over sequences s of (Σ_{t∈s} m L / Σ_{t∈s} m)
    "seq-mean-token-sum-norm": mean over sequences s of (Σ_{t∈s} m L / max_tokens_norm)
                               (Dr.GRPO: a constant, not the sequence length)
Only sequences with at least one valid token count in the sequence means. With no valid
token at all the loss is 0 (still attached to the graph), never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _sequence_index(mask: Tensor, sequence_ids: Tensor | None) -> tuple[Tensor, int]:
    """Flat [numel] sequence index of every token and the number of sequence slots."""
    if sequence_ids is not None:
        if sequence_ids.shape != mask.shape:
            raise ValueError(f"sequence_ids {tuple(sequence_ids.shape)} != mask {tuple(mask.shape)}")
        ids = sequence_ids.reshape(-1).long()
        # compact arbitrary ids (e.g. 7, 7, 3, 3) to 0..S-1
        uniq, idx = torch.unique(ids, return_inverse=True)
        return idx, int(uniq.numel())
    if mask.dim() == 2:
        b, t = mask.shape
        return torch.arange(b, device=mask.device).repeat_interleave(t), b
    if mask.dim() == 1:
        return torch.zeros(mask.numel(), dtype=torch.long, device=mask.device), 1
    raise ValueError("per-token tensors must be [B, T] or packed [N] (with sequence_ids)")


def _sequence_sums(values: Tensor, seq_idx: Tensor, num_seqs: int) -> Tensor:
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_idx, values.reshape(-1))


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: str = "token-mean",
    *,
    sequence_ids: Tensor | None = None,
    max_tokens_norm: float | None = None,
) -> Tensor:
    """Reduce a per-token quantity to a scalar over mask (see module docstring)."""
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if aggregation == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    seq_idx, num_seqs = _sequence_index(mask, sequence_ids)
    seq_sum = _sequence_sums(masked, seq_idx, num_seqs)
    seq_count = _sequence_sums(m, seq_idx, num_seqs)
    present = (seq_count > 0).to(per_token.dtype)
    if aggregation == "seq-mean-token-mean":
        per_seq = seq_sum / seq_count.clamp(min=1.0)
    else:
        if max_tokens_norm is None or max_tokens_norm <= 0:
            raise ValueError("seq-mean-token-sum-norm needs max_tokens_norm > 0 (e.g. max new tokens)")
        per_seq = seq_sum / float(max_tokens_norm)
    return (per_seq * present).sum() / present.sum().clamp(min=1.0)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _behaviour_weight(
    proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float | None, mode: str
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(w used in the loss, effective mask, stats) for w = exp(logπprox − logπbehav)."""
    if mode not in ("truncate", "mask"):
        raise ValueError(f"behaviour_weight_mode must be 'truncate' or 'mask', got {mode!r}")
    mask = mask.bool()
    w = torch.exp((proximal_logprobs - behaviour_logprobs).detach().float())
    over = (w > cap) & mask if cap is not None else torch.zeros_like(mask)
    if cap is None:
        w_used, eff_mask = w, mask
    elif mode == "truncate":
        w_used, eff_mask = w.clamp(max=cap), mask
    else:
        eff_mask = mask & ~over
        w_used = torch.where(over, torch.zeros_like(w), w)  # keeps inf/NaN out of the loss
    mf = mask.float()
    big, small = torch.finfo(w.dtype).max, torch.finfo(w.dtype).min
    any_valid = bool(mask.any())
    stats = {
        "importance_weight_mean": _masked_mean(w, mf),
        "importance_weight_max": torch.where(mask, w, small).max() if any_valid else w.new_zeros(()),
        "importance_weight_min": torch.where(mask, w, big).min() if any_valid else w.new_zeros(()),
        "behaviour_capped_fraction": _masked_mean(over.float(), mf),
    }
    return w_used, eff_mask, stats


def _clipped_objective(
    ratio: Tensor, advantages: Tensor, eps_clip_low: float, eps_clip_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-token −min(rA, clip(r)A) with optional dual clip, clipped flag, dual-clipped flag)."""
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1.0 - eps_clip_low, 1.0 + eps_clip_high) * advantages
    loss = -torch.min(surr, surr_clipped)
    clipped = surr_clipped < surr  # min picked the clipped branch
    if dual_clip is None:
        return loss, clipped, torch.zeros_like(clipped)
    if dual_clip <= 1.0:
        raise ValueError("dual_clip must be > 1")
    cap = dual_clip * advantages.abs()
    dual = (advantages < 0) & (loss > cap)
    return torch.where(dual, cap, loss), clipped, dual


def _policy_loss(
    ratio, log_ratio, proximal_logprobs, behaviour_logprobs, advantages, mask, *, eps_clip_low, eps_clip_high,
    behaviour_weight_cap, behaviour_weight_mode, dual_clip, aggregation, sequence_ids, max_tokens_norm,
):  # fmt: skip
    w, eff_mask, stats = _behaviour_weight(
        proximal_logprobs, behaviour_logprobs, mask, behaviour_weight_cap, behaviour_weight_mode
    )
    pg, clipped, dual = _clipped_objective(ratio, advantages, eps_clip_low, eps_clip_high, dual_clip)
    per_token = w.to(pg.dtype) * pg
    loss = aggregate(per_token, eff_mask, aggregation, sequence_ids=sequence_ids, max_tokens_norm=max_tokens_norm)
    m = eff_mask.float()
    with torch.no_grad():
        r, lr = ratio.detach().float(), log_ratio.detach().float()
        stats.update(
            clip_fraction=_masked_mean(clipped.float(), m),
            dual_clip_fraction=_masked_mean(dual.float(), m),
            # k3 estimate of KL(π_prox ‖ π_θ): (u − 1) − log u  (≥ 0 per token)
            approx_kl=_masked_mean((r - 1.0) - lr, m),
            ratio_mean=_masked_mean(r, m),
            num_valid_tokens=m.sum(),
        )
    return loss, {k: v.detach() for k, v in stats.items()}


def decoupled_ppo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_clip_low: float = 0.2,
    eps_clip_high: float = 0.2,
    behaviour_weight_cap: float | None = 5.0,
    behaviour_weight_mode: str = "truncate",
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    sequence_ids: Tensor | None = None,
    max_tokens_norm: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO loss (module docstring). Only `logprobs` carries gradient."""
    log_ratio = logprobs - proximal_logprobs.detach()
    ratio = torch.exp(log_ratio)
    return _policy_loss(
        ratio, log_ratio, proximal_logprobs, behaviour_logprobs, advantages.detach(), mask,
        eps_clip_low=eps_clip_low, eps_clip_high=eps_clip_high, behaviour_weight_cap=behaviour_weight_cap,
        behaviour_weight_mode=behaviour_weight_mode, dual_clip=dual_clip, aggregation=aggregation,
        sequence_ids=sequence_ids, max_tokens_norm=max_tokens_norm,
    )  # fmt: skip


def gspo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_clip_low: float = 3e-4,
    eps_clip_high: float = 4e-4,
    behaviour_weight_cap: float | None = 5.0,
    behaviour_weight_mode: str = "truncate",
    dual_clip: float | None = None,
    aggregation: str = "seq-mean-token-mean",
    sequence_ids: Tensor | None = None,
    max_tokens_norm: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: one length-normalised ratio per sequence, clipped per sequence.

        s_i = exp( (1/|y_i|) Σ_{t∈i} m_t (logπθ − logπprox) )     (mean over the input mask)
        L_t = −w_t · min(s_i A_t, clip(s_i, 1−ε_low, 1+ε_high) A_t)   for every token t of i

    With A constant within a sequence and "seq-mean-token-mean" (the default) this is the
    GSPO objective −mean_i min(s_i A_i, clip(s_i) A_i); w_t is the per-token behaviour
    weight of the decoupled loss (1 when prox == behav). The default ε values are the
    GSPO paper's (sequence ratios stay very close to 1).
    """
    m = mask.to(logprobs.dtype)
    seq_idx, num_seqs = _sequence_index(mask, sequence_ids)
    token_log_ratio = (logprobs - proximal_logprobs.detach()) * m
    seq_log_ratio = _sequence_sums(token_log_ratio, seq_idx, num_seqs) / _sequence_sums(m, seq_idx, num_seqs).clamp(min=1.0)
    log_ratio = seq_log_ratio[seq_idx].reshape(mask.shape)  # broadcast s_i to its tokens
    ratio = torch.exp(log_ratio)
    loss, stats = _policy_loss(
        ratio, log_ratio, proximal_logprobs, behaviour_logprobs, advantages.detach(), mask,
        eps_clip_low=eps_clip_low, eps_clip_high=eps_clip_high, behaviour_weight_cap=behaviour_weight_cap,
        behaviour_weight_mode=behaviour_weight_mode, dual_clip=dual_clip, aggregation=aggregation,
        sequence_ids=sequence_ids, max_tokens_norm=max_tokens_norm,
    )  # fmt: skip
    return loss, stats


def loglinear_proximal(behaviour_logprobs: Tensor, current_logprobs: Tensor, versions: Tensor, version: int) -> Tensor:
    """A-3PO's approximation of logπprox (module docstring) from the behaviour and current log-probs.
    `versions` holds each token's behaviour version (< 0 outside completions: α = 0 there); the result
    is detached, as a recomputed π_prox would be."""
    v_b = versions.to(behaviour_logprobs.dtype)
    alpha = ((version - v_b) / (version + 1 - v_b).clamp(min=1.0)).clamp(0.0, 1.0)
    alpha = torch.where(versions >= 0, alpha, torch.zeros_like(alpha))
    behaviour = behaviour_logprobs.detach()
    return behaviour + alpha * (current_logprobs.detach() - behaviour)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimators of KL(π_θ ‖ π_ref) from tokens sampled by π_θ (Schulman, 2020).

    With r = π_ref(y) / π_θ(y), i.e. log r = ref_logprobs − logprobs:
        k1 = −log r              unbiased, high variance, can be negative
        k2 = (log r)^2 / 2       biased, low variance, ≥ 0
        k3 = (r − 1) − log r     unbiased, low variance, ≥ 0
    (k1 is −log r = log π_θ − log π_ref, as in Schulman's note; it is positive on average.)
    Differentiable wrt logprobs; ref_logprobs is treated as a constant.
    """
    log_r = ref_logprobs.detach() - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    coef: float,
    aggregation: str = "token-mean",
    *,
    sequence_ids: Tensor | None = None,
    max_tokens_norm: float | None = None,
) -> Tensor:
    """Loss term −coef · aggregate(entropy): adding it to the loss rewards higher entropy."""
    return -coef * aggregate(entropy, mask, aggregation, sequence_ids=sequence_ids, max_tokens_norm=max_tokens_norm)
