"""Triton row kernels for `logprob.logprobs_and_entropy` (CUDA, or CPU under TRITON_INTERPRET=1).

The chunked Function in `logprob.py` computes each chunk's float32 logits z [c, V] with a
cuBLAS matmul and hands them here. Two kernels, one program per row, stream the row in
BLOCK_V tiles:

- `chunk_stats`: one pass with an online log-sum-exp. Per tile x, with running max m,
  running s = sum exp(z - m) and t = sum exp(z - m) * z:
      m' = max(m, max x);  s = s e^(m - m') + sum e^(x - m');  t = t e^(m - m') + sum e^(x - m') x
  then lse = m + log s,  sum_j p_j z_j = t / s,  H = lse - t / s,  logp = z_y - lse.
  (The torch path needs ~3 passes and one [c, V] temporary for the same numbers.)
- `chunk_grad`: overwrites z with d loss / d z in one pass and no temporary:
      G_j = g (1[j = y] - p_j) - e p_j (log p_j + H),  p_j = exp(z_j - lse).

Import is safe without triton: `triton_available()` says whether the kernels exist.
Whether kernels are interpreted is fixed when triton is first imported in a process (its
own standard-library kernels are decorated then), so tests run the interpreter in a child
process started with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # triton is optional (pip extra "triton"); CPU-only installs never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


if triton is not None:

    @triton.jit
    def _stats_kernel(z_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr, V, stride_row, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        m = float("-inf")
        s = 0.0
        t = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.where(valid, tl.exp(x - m_new), 0.0)
            s = s * scale + tl.sum(e, axis=0)
            t = t * scale + tl.sum(e * tl.where(valid, x, 0.0), axis=0)  # no 0 * -inf
            m = m_new
        lse = m + tl.log(s)
        label = tl.load(labels_ptr + row)
        has_label = label >= 0
        label_logit = tl.load(base + tl.where(has_label, label, 0))
        tl.store(logp_ptr + row, tl.where(has_label, label_logit - lse, 0.0))
        tl.store(ent_ptr + row, lse - t / s)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _grad_kernel(
        z_ptr,
        labels_ptr,
        lse_ptr,
        ent_ptr,
        g_lp_ptr,
        g_ent_ptr,
        V,
        stride_row,
        HAS_LP: tl.constexpr,
        HAS_ENT: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        label = tl.load(labels_ptr + row)
        g_lp = 0.0
        if HAS_LP:
            g_lp = tl.load(g_lp_ptr + row)
        g_ent = 0.0
        h = 0.0
        if HAS_ENT:
            g_ent = tl.load(g_ent_ptr + row)
            h = tl.load(ent_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
            logp = x - lse
            p = tl.exp(logp)
            g = -g_lp * p - g_ent * p * (logp + h)
            g = tl.where(offs == label, g + g_lp, g)  # label < 0 never matches
            tl.store(base + offs, g, mask=valid)


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), 4096)


def chunk_stats(z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) of each row of float32 logits z [c, V] (z is not modified)."""
    c, v = z.shape
    z = z.contiguous()
    labels = labels.contiguous()
    logp = torch.empty(c, dtype=torch.float32, device=z.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    _stats_kernel[(c,)](z, labels, logp, entropy, lse, v, z.stride(0), BLOCK_V=_block_v(v))
    return logp, entropy, lse


def chunk_grad(
    z: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, g_lp: Tensor | None, g_ent: Tensor | None
) -> Tensor:
    """Overwrite float32 logits z [c, V] with d loss / d z and return it."""
    c, v = z.shape
    if not z.is_contiguous():
        raise ValueError("chunk_grad works in place and needs contiguous logits")
    dummy = lse  # any float32 tensor: the kernel never reads it when its flag is off
    _grad_kernel[(c,)](
        z,
        labels.contiguous(),
        lse.contiguous(),
        entropy.contiguous(),
        dummy if g_lp is None else g_lp.contiguous(),
        dummy if g_ent is None else g_ent.contiguous(),
        v,
        z.stride(0),
        HAS_LP=g_lp is not None,
        HAS_ENT=g_ent is not None,
        BLOCK_V=_block_v(v),
    )
    return z
