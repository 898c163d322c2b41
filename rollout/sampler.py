"""Vectorised per-row sampling with per-request temperature / top-k / top-p / greedy / seed.

Sampling is the Gumbel-max trick with counter-based noise:

    token = argmax_v ( logp_v + g_v ),   g_v = -log(-log u_v),   u_v = hash(seed, sample, step, v)

where ``logp = log_softmax(mask_topk_topp(logits / T))``. Because the noise depends only on
(request seed, sample index, output position, vocab id), a seeded request reproduces the same
tokens whatever else shares its batch, and after preemption or recompute.
The returned log-prob is ``logp[token]`` (for greedy rows: ``log_softmax(logits)[argmax]``).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (Wellons) on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def uniform_noise(seeds: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] in (0, 1), a pure function of (seeds[b], samples[b], steps[b], v)."""
    h = _mix32(seeds[:, None] ^ (seeds[:, None] >> 32))
    h = _mix32(h ^ _mix32(samples[:, None] + 0x9E3779B9))
    h = _mix32(h ^ _mix32(steps[:, None] * 0x85EBCA6B + 0x27D4EB2F))
    v = torch.arange(vocab, device=seeds.device, dtype=torch.long)[None, :]
    h = _mix32(h ^ _mix32(v * 0xC2B2AE35 + 0x165667B1))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k (k=0: off) or top-p nucleus (p=1: off).

    Nucleus: keep the smallest prefix of the descending-sorted distribution whose mass >= p
    (a token is dropped when the mass strictly before it already reaches p).
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = drop | (mass_before >= top_p[:, None].to(probs.dtype))
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class SamplingBatch:
    """Per-row parameters as tensors (built once per step from the rows' requests)."""

    def __init__(self, temperature, top_k, top_p, seeds, samples, steps, device="cpu", any_seeded=True) -> None:
        self.any_seeded = any_seeded
        self.temperature = torch.tensor(temperature, dtype=torch.float32, device=device)
        self.greedy = self.temperature <= 0
        self.all_greedy = bool(self.greedy.all())
        self.top_k = torch.tensor(top_k, dtype=torch.long, device=device)
        self.top_p = torch.tensor(top_p, dtype=torch.float32, device=device)
        self.needs_filter = any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p)
        self.seeds = torch.tensor(seeds, dtype=torch.long, device=device)
        self.samples = torch.tensor(samples, dtype=torch.long, device=device)
        self.steps = torch.tensor(steps, dtype=torch.long, device=device)


def _logprob_at(scaled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(scaled)[tokens] without materialising the full log-softmax."""
    return scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, -1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (tokens [B], logprobs [B])."""
    if batch.all_greedy:
        tokens = logits.argmax(-1)
        return tokens, _logprob_at(logits, tokens)
    any_greedy = bool(batch.greedy.any())
    temp = torch.where(batch.greedy, torch.ones_like(batch.temperature), batch.temperature) if any_greedy else batch.temperature
    scaled = logits / temp[:, None]
    if batch.needs_filter:
        filtered = mask_top_k_top_p(scaled, batch.top_k, batch.top_p)
        scaled = torch.where(batch.greedy[:, None], scaled, filtered) if any_greedy else filtered
    if batch.any_seeded:
        u = uniform_noise(batch.seeds, batch.samples, batch.steps, logits.shape[-1])
        gumbel = -torch.log(-torch.log(u))
    else:  # no row asked for reproducibility: the global RNG is cheaper than hashing
        # g = -log(-log u), u ~ U[0, 1) (rand_like + in-place ops: exponential_ is ~5x slower on CPU).
        # u = 0 gives g = -inf (that token just cannot win); u < 1 always, so g is never +inf.
        gumbel = torch.rand_like(scaled).log_().neg_().log_().neg_()
    # argmax(scaled + g) == argmax(log_softmax(scaled) + g): the normaliser is constant per row
    tokens = (gumbel.add_(scaled)).argmax(-1)
    if any_greedy:
        tokens = torch.where(batch.greedy, logits.argmax(-1), tokens)
    return tokens, _logprob_at(scaled, tokens)
