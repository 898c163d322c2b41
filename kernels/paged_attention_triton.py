"""Triton kernels: paged-attention decode step and the KV-cache write (CUDA; CPU via TRITON_INTERPRET=1).

Same contracts as the PyTorch references in ``paged_attention.py``:
- ``write_kv_cache_triton``: k_cache[slot_mapping[t]] = key[t] (negative slots are skipped).
- ``paged_attention_decode_triton``: one query per sequence at position context_len - 1;
  each program owns one (sequence, query head) and streams the sequence's blocks with an
  online softmax (running max m, normaliser l, accumulator acc):
      m' = max(m, max_j s_j);  l' = l e^{m-m'} + sum_j e^{s_j-m'};  acc' = acc e^{m-m'} + sum_j e^{s_j-m'} v_j
Import this module only where triton is available (it is imported lazily by the engine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(key_ptr + t * ROW + offs, mask=mask)
        v = tl.load(value_ptr + t * ROW + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def write_kv_cache_triton(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value [T, Hkv, D]; caches [S, Hkv, D] (contiguous rows of Hkv*D)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row = key.shape[1] * key.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _write_kv_kernel[(num_tokens,)](
        key.contiguous(), value.contiguous(), k_cache, v_cache, slot_mapping.contiguous(),
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, out_ptr,
    scale, table_stride,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (NUM_HEADS // NUM_KV_HEADS)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (b * NUM_HEADS + h) * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
    ctx = tl.load(lens_ptr + b)
    j = tl.arange(0, BLOCK_SIZE)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
        block = tl.load(tables_ptr + b * table_stride + i)
        slots = block * BLOCK_SIZE + j
        valid = (i * BLOCK_SIZE + j) < ctx
        row = (slots[:, None] * NUM_KV_HEADS + kvh) * HEAD_DIM + d[None, :]
        lmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + row, mask=lmask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_cache_ptr + row, mask=lmask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    out = acc / l
    tl.store(out_ptr + (b * NUM_HEADS + h) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def paged_attention_decode_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """query [B, H, D]; caches [S, Hkv, D]; block_tables [B, M]; context_lens [B] (>= 1) -> [B, H, D]."""
    num_seqs, num_heads, head_dim = query.shape
    if block_size & (block_size - 1):
        raise ValueError(f"triton decode needs a power-of-two block_size, got {block_size}")
    out = torch.empty_like(query)
    tables = block_tables.to(torch.int32).contiguous()
    _decode_kernel[(num_seqs, num_heads)](
        query.contiguous(), k_cache, v_cache, tables, context_lens.to(torch.int32).contiguous(), out,
        scale, tables.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
    )
    return out
