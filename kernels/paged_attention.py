"""Paged attention over a block-structured KV cache: PyTorch reference (used on CPU).

Layout (one layer): ``k_cache``/``v_cache`` are ``[num_blocks * block_size, Hkv, D]``; the
token at logical position ``p`` of a sequence with block table ``bt`` lives at slot
``bt[p // block_size] * block_size + p % block_size``.

Varlen attention: sequence ``b`` has ``n_b`` new query tokens, which are the LAST ``n_b``
positions of its ``context_len_b`` cached tokens (their K/V were written first). Query at
position ``q`` attends keys ``j`` with ``j <= q`` (and ``j > q - window`` for a sliding window):

    out_q = softmax(scale * q . K_j^T  over allowed j) @ V_j

GQA: query head ``h`` reads kv head ``h // (H / Hkv)``. Pure torch; imports nothing of areal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k_cache[slot_mapping[t]] = key[t] (same for v). key/value: [T, Hkv, D]; caches: [S, Hkv, D]."""
    k_cache.index_copy_(0, slot_mapping, key)
    v_cache.index_copy_(0, slot_mapping, value)


@dataclass
class VarlenPlan:
    """Per-step gather/scatter indices, built once and reused by every layer."""

    block_index: torch.Tensor  # [B * M] block ids of each sequence's table (M = padded table width)
    num_seqs: int
    table_width: int  # M
    allowed: torch.Tensor  # [B, 1, Q, M * block_size] bool: query q of sequence b may attend key j
    query_index: torch.Tensor | None  # [B, Q] row of the packed query tensor (None: one query per sequence)
    packed_rows: torch.Tensor | None  # flat index into [B*Q] of the valid queries, in packed order


def build_varlen_plan(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: torch.Tensor,
    block_size: int,
    sliding_window: int | None = None,
) -> VarlenPlan:
    """Indices for attention of ``query_lens[b]`` new tokens per sequence (packed in sequence order).

    Keys are gathered a whole block at a time (contiguous block_size*Hkv*D copies), so the key axis
    is padded to M * block_size and masked by position.
    """
    device = block_tables.device
    num_seqs, width = block_tables.shape
    max_q = int(query_lens.max())
    qi = torch.arange(max_q, device=device)
    query_valid = qi[None, :] < query_lens[:, None]  # [B, Q]
    qpos = context_lens[:, None] - query_lens[:, None] + qi[None, :]  # absolute position of each query slot
    kj = torch.arange(width * block_size, device=device)
    allowed = kj[None, None, :] <= qpos[:, :, None]
    if sliding_window is not None:
        allowed &= kj[None, None, :] > qpos[:, :, None] - sliding_window
    if max_q == 1:
        return VarlenPlan(block_tables.reshape(-1), num_seqs, width, allowed[:, None], None, None)
    starts = torch.cumsum(query_lens, 0) - query_lens
    query_index = torch.where(query_valid, starts[:, None] + qi[None, :], torch.zeros_like(qi)[None, :])
    # padded query rows attend key 0 only, so softmax has no empty row (their output is dropped)
    allowed = torch.where(query_valid[:, :, None], allowed, (kj == 0)[None, None, :])
    packed_rows = (torch.arange(num_seqs, device=device)[:, None] * max_q + qi[None, :])[query_valid]
    return VarlenPlan(block_tables.reshape(-1), num_seqs, width, allowed[:, None], query_index, packed_rows)


def gather_blocks(cache: torch.Tensor, plan: VarlenPlan, block_size: int) -> torch.Tensor:
    """[slots, Hkv, D] cache -> [B, Hkv, M * block_size, D] (a strided view of one contiguous gather)."""
    blocks = cache.view(-1, block_size, *cache.shape[1:]).index_select(0, plan.block_index)
    return blocks.view(plan.num_seqs, plan.table_width * block_size, *cache.shape[1:]).transpose(1, 2)


def paged_attention_planned(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: VarlenPlan, scale: float
) -> torch.Tensor:
    """Varlen paged attention with a prebuilt plan. query: [T, H, D] packed -> [T, H, D]."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size = plan.allowed.shape[-1] // plan.table_width
    k = gather_blocks(k_cache, plan, block_size)
    v = gather_blocks(v_cache, plan, block_size)
    gqa = k.shape[1] != num_heads
    if plan.query_index is None:  # one query per sequence (decode)
        q = query[:, :, None]  # [B, H, 1, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.allowed, scale=scale, enable_gqa=gqa)
        return out[:, :, 0]
    q = query[plan.query_index].transpose(1, 2)  # [B, H, Q, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.allowed, scale=scale, enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [B*Q, H, D]
    return out[plan.packed_rows]


def paged_attention_varlen(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference varlen paged attention (prefill chunks and decode alike). query: [T, H, D]."""
    plan = build_varlen_plan(block_tables, context_lens, query_lens, block_size, sliding_window)
    return paged_attention_planned(query, k_cache, v_cache, plan, scale)


def paged_attention_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference decode step: one query per sequence at position context_len - 1. query: [B, H, D]."""
    ones = torch.ones_like(context_lens)
    return paged_attention_varlen(
        query, k_cache, v_cache, block_tables, context_lens, ones, scale, block_size, sliding_window
    )


def naive_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention of one sequence's last Q positions over its L keys (test oracle).

    query [Q, H, D], keys/values [L, Hkv, D] -> [Q, H, D], written with explicit loops-free math.
    """
    num_q, num_heads, _ = query.shape
    rep = num_heads // keys.shape[1]
    k = keys.repeat_interleave(rep, dim=1)
    v = values.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, k) * scale
    total = keys.shape[0]
    qpos = torch.arange(total - num_q, total)[:, None]
    scores = scores.masked_fill(torch.arange(total)[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
