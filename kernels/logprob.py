"""Token log-probabilities and entropies from hidden states, without the [N, V] logits.

For token i with hidden state h_i, LM head W [V, H] (bias b optional), label y_i and
sampling temperature T:

    z_i      = (h_i W^T + b) / T                       logits, [V]
    lse_i    = log sum_j exp(z_ij)
    logp_i   = z_{i, y_i} - lse_i                      log pi(y_i)
    p_ij     = exp(z_ij - lse_i)
    H_i      = -sum_j p_ij log p_ij = lse_i - sum_j p_ij z_ij

Gradients with respect to the logits, given upstream grads g_i (log-prob) and e_i (entropy):

    d logp_i / d z_ij = 1[j = y_i] - p_ij
    d H_i    / d z_ij = -p_ij (log p_ij + H_i)
    G_ij             = g_i (1[j = y_i] - p_ij) - e_i p_ij (log p_ij + H_i)

and then, since z = (h W^T + b) / T:

    grad_h = G W / T,   grad_W = G^T h / T,   grad_b = sum_i G_i / T.

Memory: the N tokens are processed in chunks of `chunk_size`; only one chunk's float32
logits [chunk, V] (plus at most one same-sized temporary) is alive at a time, forward and
backward. The autograd Function saves hidden, weight, bias, labels and two per-token floats
(lse and entropy; entropy is saved rather than recomputed because it costs N floats and
saves a reduction pass over [chunk, V] in backward). Backward recomputes each chunk's
logits: one extra matmul, in exchange for never holding [N, V].

All maths is in float32 (bf16/fp16 inputs are cast per chunk; the weight is cast once);
outputs are float32. Labels < 0 are "ignored": their log-prob is 0 and they contribute no
log-prob gradient (entropy is still computed for them).

On CUDA with triton installed, the per-chunk row reductions (forward stats and the
in-place backward logits gradient) run as Triton kernels (`logprob_triton.py`); the
matmuls stay on cuBLAS via torch. Everything else is plain torch.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Naive reference: log_softmax(logits / T) gathered at labels (materialises [N, V])."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Naive reference entropy -sum p log p of softmax(logits / T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---- per-chunk row operations (torch); the Triton module provides the same two ----------


def _chunk_stats_torch(z: Tensor, labels: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) of each row of float32 logits z [c, V]. Overwrites z.

    scratch: optional reusable [c, V] float32 buffer for exp(z) (saves page faults).
    """
    safe = labels.clamp(min=0).unsqueeze(1)
    label_logit = z.gather(1, safe).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)  # z' = z - max <= 0, so exp cannot overflow
    e = torch.exp(z) if scratch is None else torch.exp(z, out=scratch)
    s = e.sum(dim=1)
    # sum_j e_j z'_j as a batched dot product: no [c, V] temporary
    t = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
    del e
    log_s = torch.log(s)
    m = m.squeeze(1)
    lse = m + log_s
    logp = torch.where(labels >= 0, label_logit - lse, torch.zeros_like(lse))
    entropy = log_s - t / s
    return logp, entropy, lse


def _chunk_grad_torch(
    z: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    g_lp: Tensor | None,
    g_ent: Tensor | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """d loss / d z for float32 logits z [c, V], computed in place into z (returned)."""
    z.sub_(lse.unsqueeze(1))  # z is now log p
    if g_ent is not None:
        p = torch.exp(z) if scratch is None else torch.exp(z, out=scratch)
        # -e * p * (log p + H)
        z.add_(entropy.unsqueeze(1)).mul_(p).mul_(-g_ent.unsqueeze(1))
        if g_lp is not None:
            z.addcmul_(p, g_lp.unsqueeze(1), value=-1.0)
        del p
    else:
        z.exp_().mul_(-g_lp.unsqueeze(1))
    if g_lp is not None:
        valid = labels >= 0
        rows = torch.arange(z.shape[0], device=z.device)[valid]
        z[rows, labels[valid]] += g_lp[valid]
    return z


def _row_ops(device: torch.device, backend: str):
    """Pick (stats, grad) chunk functions.

    "auto": Triton on CUDA tensors when triton imports, else torch. "triton": Triton on
    CUDA, or on CPU under its interpreter (TRITON_INTERPRET=1, for tests). "torch": torch.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    runnable = device.type == "cuda" or (backend == "triton" and interpret)
    if backend != "torch" and runnable:
        from areal.kernels import logprob_triton  # lazy: triton is optional

        if logprob_triton.triton_available():
            return logprob_triton.chunk_stats, logprob_triton.chunk_grad
    if backend == "triton":
        raise RuntimeError("backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return _chunk_stats_torch, _chunk_grad_torch


def _chunk_logits(h: Tensor, w32: Tensor, b32: Tensor | None, inv_t: float, out: Tensor) -> Tensor:
    """float32 (h W^T + b) / T for one chunk into `out`; scaling h (and b) is cheaper than z."""
    h = h.float() * inv_t
    if b32 is None:
        return torch.mm(h, w32.t(), out=out)
    return torch.addmm(b32 * inv_t, h, w32.t(), out=out)


def _buffers(n: int, chunk_size: int, v: int, device: torch.device, count: int) -> list[Tensor]:
    """[min(chunk, n), V] float32 buffers reused by every chunk (one allocation, no re-faulting)."""
    return [torch.empty(min(chunk_size, n), v, dtype=torch.float32, device=device) for _ in range(count)]


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, backend):
        stats_fn, grad_fn = _row_ops(hidden.device, backend)
        inv_t = 1.0 / temperature
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        torch_path = stats_fn is _chunk_stats_torch
        bufs = _buffers(n, chunk_size, weight.shape[0], hidden.device, 2 if torch_path else 1)
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            c = min(chunk_size, n - s)
            z = _chunk_logits(hidden[sl], w32, b32, inv_t, out=bufs[0][:c])
            extra = {"scratch": bufs[1][:c]} if torch_path else {}
            logp[sl], entropy[sl], lse[sl] = stats_fn(z, labels[sl], **extra)
        del bufs
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.inv_t, ctx.chunk_size, ctx.grad_fn = inv_t, chunk_size, grad_fn
        ctx.set_materialize_grads(False)  # unused output -> None grad: skip its work
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        inv_t, chunk_size = ctx.inv_t, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b else None
        n = hidden.shape[0]
        torch_path = ctx.grad_fn is _chunk_grad_torch
        two = torch_path and g_entropy is not None  # exp(z) scratch only for the entropy grad
        bufs = _buffers(n, chunk_size, weight.shape[0], hidden.device, 2 if two else 1)
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            c = min(chunk_size, n - s)
            # ignored labels (< 0) have a constant log-prob of 0: no gradient through it
            g_lp = None if g_logp is None else g_logp[sl].float().masked_fill(labels[sl] < 0, 0.0)
            g_ent = None if g_entropy is None else g_entropy[sl].float()
            if g_lp is None and g_ent is None:
                continue
            h = hidden[sl]
            z = _chunk_logits(h, w32, b32, inv_t, out=bufs[0][:c])
            extra = {"scratch": bufs[1][:c]} if two else {}
            g = ctx.grad_fn(z, labels[sl], lse[sl], entropy[sl], g_lp, g_ent, **extra)  # dL/dz in place
            if need_h:
                torch.mm(g, w32, out=grad_h[sl])
                grad_h[sl].mul_(inv_t)
            if need_w:
                grad_w.addmm_(g.t(), h.float(), alpha=inv_t)
            if need_b:
                grad_b.add_(g.sum(0), alpha=inv_t)
        if g_logp is None and g_entropy is None and need_h:
            grad_h.zero_()
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    lm_head_bias: Tensor | None = None,
    chunk_size: int = 1024,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-token log pi(label) and entropy of softmax((hidden W^T + b) / T), float32 [N] each.

    hidden [N, H], lm_head_weight [V, H], labels [N] (long; < 0 means ignored -> logp 0).
    Differentiable wrt hidden, weight and bias through both outputs, chunked so that at
    most one [chunk_size, V] float32 logits block (plus one temporary) exists at a time.
    backend: "auto" (Triton row kernels on CUDA when triton imports, else torch),
    "torch", or "triton".
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or labels.dim() != 1:
        raise ValueError("expected hidden [N, H], lm_head_weight [V, H], labels [N]")
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"shape mismatch: {tuple(hidden.shape)}, {tuple(lm_head_weight.shape)}, {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return _LogprobEntropy.apply(hidden, lm_head_weight, lm_head_bias, labels.long(), float(temperature), int(chunk_size), backend)
