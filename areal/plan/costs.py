"""The cost model: pure functions from an architecture, a device profile and a workload to seconds.

Notation: P = stored parameters, P_mm = matmul parameters (areal/plan/models.py), L = layers,
d = hidden size, b = dtype bytes, n = sequence length, c = tokens in the KV cache (all running
sequences together), B_s = running sequences.

Forward FLOPs of one sequence of n tokens (causal attention adds QKᵀ and AV over half the square):

    F_fwd(n) = 2·P_mm·n + 2·L·d·n²

Training (forward + backward = 3 forwards; decoupled PPO with `proximal=recompute` adds one forward
for π_prox, a KL reference another). A group is a prompt of p tokens and completions c_1..c_k; with
areal's `trainer.share_prompts` the prompt is packed once for the whole group:

    shared:     tokens_g = p + Σ c_i        attention_g = p² + Σ (c_i² + 2·p·c_i)
    not shared: tokens_g = Σ (p + c_i)      attention_g = Σ (p + c_i)²
    F_train = (3 + extra_forwards) · Σ_g (2·P_mm·tokens_g + 2·L·d·attention_g)
    t_train = F_train / (D · train_flops_s) + (Σ_g tokens_g · train_token_s + S · train_seq_s) / D
              + M · (train_update_s + 2·(D−1)/D · P·b / link_bw)       (M minibatch updates; a ring
                                                                           all-reduce of the gradients)
Decoding is memory-bound until the batch is large: one step reads the weights once and every
running sequence's KV cache, and computes one token per sequence:

    bytes_step = P·b + c·kv_bytes_per_token          F_step = 2·P_mm·B_s + 4·L·d·c
    t_step     = decode_step_s + B_s·decode_seq_s + max(bytes_step / decode_bytes_s, F_step / infer_flops_s)

(divided by the tensor-parallel degree t for a server of t devices). Prefill of a prompt of n tokens
is compute-bound: F_fwd(n) / infer_flops_s.

Weight broadcast from the trainer to the rollout servers: latency + P·b / bw, with bw the NVLink
bandwidth when everything fits in one node and the network bandwidth otherwise.

KV capacity of a server of t devices: (t · mem · kv_memory_fraction − P·b) / kv_bytes_per_token tokens.
"""

from __future__ import annotations

import math

import numpy as np

from areal.plan.hardware import Hardware
from areal.plan.models import Architecture


def forward_flops(arch: Architecture, n: int | float) -> float:
    """F_fwd(n) = 2·P_mm·n + 2·L·d·n²."""
    return 2.0 * arch.matmul_params * n + 2.0 * arch.layers * arch.hidden * n * n


def packed_tokens(groups, share_prompts: bool) -> tuple[float, float]:
    """(Σ tokens_g, Σ attention_g) of the module docstring; `groups` = [(p, [c_1, ..., c_k]), ...]."""
    tokens = attention = 0.0
    for p, completions in groups:
        c = np.asarray(completions, dtype=float)
        if share_prompts:
            tokens += p + c.sum()
            attention += p * p + float((c * c + 2 * p * c).sum())
        else:
            tokens += float((p + c).sum())
            attention += float(((p + c) ** 2).sum())
    return tokens, attention


def train_flops(arch: Architecture, groups, extra_forwards: int, share_prompts: bool = True) -> float:
    """F_train = (3 + extra_forwards) · Σ_g (2·P_mm·tokens_g + 2·L·d·attention_g)."""
    tokens, attention = packed_tokens(groups, share_prompts)
    return (3 + extra_forwards) * (2.0 * arch.matmul_params * tokens + 2.0 * arch.layers * arch.hidden * attention)


def allreduce_time(arch: Architecture, hw: Hardware, devices: int) -> float:
    """Ring all-reduce of the gradients: 2·(D−1)/D · P·b / link_bw (0 on one device)."""
    if devices <= 1:
        return 0.0
    bw = hw.intra_bw if devices <= hw.devices_per_node else hw.inter_bw
    return 2.0 * (devices - 1) / devices * arch.params * hw.dtype_bytes / bw


def train_time(arch: Architecture, hw: Hardware, groups, devices: int, minibatches: int,
               extra_forwards: int, share_prompts: bool = True) -> float:
    """t_train of the module docstring, for one step over `groups` = [(p, [c_1, ..., c_k]), ...]."""
    tokens, _ = packed_tokens(groups, share_prompts)
    sequences = sum(len(c) for _, c in groups)
    return (train_flops(arch, groups, extra_forwards, share_prompts) / (devices * hw.train_flops_s)
            + (tokens * hw.train_token_s + sequences * hw.train_seq_s) / devices
            + minibatches * (hw.train_update_s + allreduce_time(arch, hw, devices)))


def decode_step_time(arch: Architecture, hw: Hardware, running: int, kv_tokens: float, tp: int = 1) -> float:
    """t_step = decode_step_s + B_s·decode_seq_s + max(bytes/decode_bytes_s, F/infer_flops_s), over t devices."""
    if running <= 0:
        return 0.0
    bytes_step = arch.params * hw.dtype_bytes + kv_tokens * arch.kv_bytes_per_token(hw.dtype_bytes)
    flops_step = 2.0 * arch.matmul_params * running + 4.0 * arch.layers * arch.hidden * kv_tokens
    return (hw.decode_step_s + running * hw.decode_seq_s
            + max(bytes_step / hw.decode_bytes_s, flops_step / hw.infer_flops_s) / tp)


def prefill_time(arch: Architecture, hw: Hardware, prompt_len: int, tp: int = 1) -> float:
    """F_fwd(n) / infer_flops_s over t devices."""
    return forward_flops(arch, prompt_len) / (hw.infer_flops_s * tp)


def weight_sync_time(arch: Architecture, hw: Hardware, devices_spanned: int) -> float:
    """latency + P·b / bw; NVLink inside one node, the network across nodes."""
    bw = hw.intra_bw if devices_spanned <= hw.devices_per_node else hw.inter_bw
    return hw.weight_sync_latency_s + arch.params * hw.dtype_bytes / bw


def tensor_parallel(arch: Architecture, hw: Hardware) -> int:
    """Smallest power-of-two server size t whose memory holds the weights in at most half of it."""
    t = 1
    while arch.params * hw.dtype_bytes > 0.5 * t * hw.mem_bytes * hw.kv_memory_fraction and t < hw.devices_per_node:
        t *= 2
    return t


def kv_capacity_tokens(arch: Architecture, hw: Hardware, tp: int = 1) -> int:
    """(t · mem · kv_memory_fraction − P·b) / kv_bytes_per_token."""
    free = tp * hw.mem_bytes * hw.kv_memory_fraction - arch.params * hw.dtype_bytes
    return max(0, int(free // arch.kv_bytes_per_token(hw.dtype_bytes)))


def lognormal_lengths(mean: float, max_len: int, sigma: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Completion lengths: lognormal(μ, σ) capped at max_len (those hit the cap, as truncated samples),
    floored at 1; μ = ln(mean) − σ²/2, so the uncapped mean is `mean` (the capped one is a little less)."""
    mu = math.log(max(mean, 1.0)) - sigma * sigma / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, count)), 1, max_len).astype(int)


def effective_tokens_per_s(tokens_per_step: float, step_s: float) -> float:
    """Trained (prompt + completion) tokens per second of wall time."""
    return tokens_per_step / step_s if step_s > 0 else 0.0
