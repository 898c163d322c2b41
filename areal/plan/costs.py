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

The extra forwards run over the whole batch at once, so a shared prompt is packed once. The M PPO
minibatches are a random split of the S sequences (areal's `randperm(S).chunk(M)`), and each minibatch
packs the prompt of every group it holds a sample of: a group of k samples is in
    T_g = Σ_j (1 − C(S − k, m_j) / C(S, m_j))        minibatches on average (m_j: their sizes),
so the update passes (forward + backward = 3 forwards) see, shared,
    utokens_g = T_g·p + Σ c_i                  uattention_g = T_g·p² + Σ (c_i² + 2·p·c_i)
(T_g → M for large groups: at M = 4 a prompt is trained on ~4 times, not once; unshared, utokens_g = tokens_g).

The output head (V·d of P_mm) runs only on the completion targets (Σ c_i per pass: areal's trainer
selects their hidden states before the head), the rest of the model on every packed token:

    F_pass(t, a) = 2·(P_mm − V·d)·t + 2·V·d·Σ_g Σ c_i + 2·L·d·a
    F_train = extra_forwards · F_pass(Σ tokens_g, Σ attention_g) + 3 · F_pass(Σ utokens_g, Σ uattention_g)
    t_train = F_train / (D · train_flops_s) + (Σ_g (extra_forwards·tokens_g + 3·utokens_g) · train_token_s
              + S · train_seq_s) / D
              + M · (train_update_s + 2·(D−1)/D · P·b / link_bw)       (M minibatch updates; a ring
                                                                           all-reduce of the gradients)
(train_token_s: host work per token and forward pass; on D devices the minibatches' groups are split
further, which this count ignores.)

Decoding is memory-bound until the batch is large: one step reads the weights once and every
running sequence's KV cache, and computes one token per sequence:

    bytes_step = P·b + c·kv_bytes_per_token          F_step = 2·P_mm·B_s + 4·L·d·c
    t_step     = decode_step_s + B_s·decode_seq_s + c·decode_kv_token_s
                 + max(bytes_step / decode_bytes_s, F_step / infer_flops_s)

(the max divided by the tensor-parallel degree t for a server of t devices; decode_kv_token_s is the
host's work per cached token, the paged-cache reads a CPU pays far beyond their FLOPs: measured by the
`here` profile, 0 on GPUs, where the bytes term holds the reads). Prefill of a prompt of n tokens
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


def minibatch_touches(group_size: int, sequences: int, minibatches: int) -> float:
    """T_g = Σ_j (1 − C(S − k, m_j) / C(S, m_j)): the expected number of the M minibatches (torch.chunk of a
    random permutation of the S sequences: sizes m_j = ceil(S/M), the last one the rest) that hold at least one
    of a group's k sequences."""
    S, k = sequences, group_size
    if S <= 0 or k <= 0:
        return 0.0
    m = -(-S // max(1, minibatches))
    sizes = [m] * (S // m) + ([S % m] if S % m else [])
    touches = 0.0
    for size in sizes:
        none = 1.0  # C(S - k, size) / C(S, size): no sample of the group among `size` drawn of S
        for i in range(k):
            none *= max(0.0, (S - size - i) / (S - i))
        touches += 1.0 - none
    return touches


def update_tokens(groups, minibatches: int, share_prompts: bool) -> tuple[float, float]:
    """(Σ utokens_g, Σ uattention_g) of the module docstring: tokens of the M minibatch updates together, a
    shared prompt packed once per minibatch that holds its group (T_g times)."""
    if not share_prompts:
        return packed_tokens(groups, False)
    sequences = sum(len(c) for _, c in groups)
    tokens = attention = 0.0
    for p, completions in groups:
        c = np.asarray(completions, dtype=float)
        touches = minibatch_touches(len(c), sequences, minibatches)
        tokens += touches * p + c.sum()
        attention += touches * p * p + float((c * c + 2 * p * c).sum())
    return tokens, attention


def train_flops(arch: Architecture, groups, extra_forwards: int, share_prompts: bool = True,
                minibatches: int = 1) -> float:
    """F_train = extra_forwards · F_pass(Σ tokens_g, Σ attention_g) + 3 · F_pass(Σ utokens_g, Σ uattention_g),
    with F_pass(t, a) = 2·(P_mm − V·d)·t + 2·V·d·(completion targets) + 2·L·d·a."""
    tokens, attention = packed_tokens(groups, share_prompts)
    utokens, uattention = update_tokens(groups, minibatches, share_prompts)
    head = arch.vocab * arch.hidden
    targets = float(sum(sum(c) for _, c in groups))
    per_pass = lambda t, a: (2.0 * (arch.matmul_params - head) * t + 2.0 * head * targets  # noqa: E731
                             + 2.0 * arch.layers * arch.hidden * a)
    return extra_forwards * per_pass(tokens, attention) + 3 * per_pass(utokens, uattention)


def token_passes(groups, extra_forwards: int, share_prompts: bool = True, minibatches: int = 1) -> float:
    """Σ_g (extra_forwards·tokens_g + 3·utokens_g): tokens times the forward passes they go through."""
    tokens, _ = packed_tokens(groups, share_prompts)
    return extra_forwards * tokens + 3 * update_tokens(groups, minibatches, share_prompts)[0]


def allreduce_time(arch: Architecture, hw: Hardware, devices: int) -> float:
    """Ring all-reduce of the gradients: 2·(D−1)/D · P·b / link_bw (0 on one device)."""
    if devices <= 1:
        return 0.0
    bw = hw.intra_bw if devices <= hw.devices_per_node else hw.inter_bw
    return 2.0 * (devices - 1) / devices * arch.params * hw.dtype_bytes / bw


def train_time(arch: Architecture, hw: Hardware, groups, devices: int, minibatches: int,
               extra_forwards: int, share_prompts: bool = True) -> float:
    """t_train of the module docstring, for one step over `groups` = [(p, [c_1, ..., c_k]), ...]."""
    sequences = sum(len(c) for _, c in groups)
    passes = token_passes(groups, extra_forwards, share_prompts, minibatches)
    return (train_flops(arch, groups, extra_forwards, share_prompts, minibatches) / (devices * hw.train_flops_s)
            + (passes * hw.train_token_s + sequences * hw.train_seq_s) / devices
            + minibatches * (hw.train_update_s + allreduce_time(arch, hw, devices)))


def decode_step_time(arch: Architecture, hw: Hardware, running: int, kv_tokens: float, tp: int = 1) -> float:
    """t_step = decode_step_s + B_s·decode_seq_s + c·decode_kv_token_s + max(bytes/decode_bytes_s, F/infer_flops_s),
    over t devices."""
    if running <= 0:
        return 0.0
    bytes_step = arch.params * hw.dtype_bytes + kv_tokens * arch.kv_bytes_per_token(hw.dtype_bytes)
    flops_step = 2.0 * arch.matmul_params * running + 4.0 * arch.layers * arch.hidden * kv_tokens
    return (hw.decode_step_s + running * hw.decode_seq_s + kv_tokens * hw.decode_kv_token_s
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


def capped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ lognormal(μ, σ):
    e^(μ+σ²/2)·Φ((ln cap − μ − σ²)/σ) + cap·(1 − Φ((ln cap − μ)/σ))."""
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma * sigma / 2) * phi(z - sigma) + cap * (1.0 - phi(z))


def lognormal_mu(mean: float, max_len: int, sigma: float) -> float:
    """μ whose lengths, capped at max_len, have the given mean (a measured mean is of capped lengths: a run's
    truncated samples stop at the cap); bisection on the increasing capped_lognormal_mean."""
    mean = min(max(mean, 1.0), 0.999 * max_len)  # a mean at the cap needs μ → ∞: nearly every sample capped
    lo, hi = math.log(mean) - sigma * sigma / 2, math.log(max_len) + 10 * sigma  # uncapped μ: capped mean ≤ mean
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if capped_lognormal_mean(mid, sigma, max_len) < mean else (lo, mid)
    return (lo + hi) / 2


def lognormal_lengths(mean: float, max_len: int, sigma: float, count: int, rng: np.random.Generator,
                      capped_mean: bool = False) -> np.ndarray:
    """Completion lengths: lognormal(μ, σ) capped at max_len (those hit the cap, as truncated samples),
    floored at 1. μ = ln(mean) − σ²/2, so the uncapped mean is `mean` (the capped one is a little less);
    with `capped_mean` (a mean measured by a run, whose truncated samples stop at the cap) μ = lognormal_mu,
    so the capped lengths have that mean."""
    mu = lognormal_mu(mean, max_len, sigma) if capped_mean else math.log(max(mean, 1.0)) - sigma * sigma / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, count)), 1, max_len).astype(int)


def effective_tokens_per_s(tokens_per_step: float, step_s: float) -> float:
    """Trained (prompt + completion) tokens per second of wall time."""
    return tokens_per_step / step_s if step_s > 0 else 0.0
