"""Runs an unmodified Hugging Face causal LM over one packed (varlen) step with a paged KV cache.

All tokens scheduled in a step (decode tokens and prefill chunks of any number of sequences)
are flattened into ONE ``[1, T]`` batch with per-token position ids. The model's own modules
run as usual (embeddings, rope, norms, MLP); only attention is swapped, through transformers'
``AttentionInterface``: our function receives q/k/v after rope, writes k/v into the paged
cache, and attends over each sequence's cached context. Logits are computed only for the
rows that sample a token.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from areal.kernels.paged_attention import (
    VarlenPlan,
    build_varlen_plan,
    paged_attention_planned,
    write_kv_cache,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ATTN_IMPL_NAME = "areal_paged"
PREPACK_MIN_WEIGHT = 1 << 17  # oneDNN-prepack only linears with at least this many weights (measured)
DECODE_BUCKET_GROWTH = 2  # a new decode bucket starts where a table is this many times the bucket's first
# ... or where its gathered K and V would pass this many bytes: a CPU attends to a copy of each bucket's cache
# blocks, and once the copies and the cache outgrow the last-level cache every cached token costs several times
# more (measured: 128 sequences' step went from 9 to 24 ms between 64 and 96 tokens of context; 11 ms in 2 MiB buckets)
DECODE_GATHER_BYTES = 2 << 20


@dataclass
class StepContext:
    """What the attention function needs for one step; built once, shared by every layer."""

    kv: torch.Tensor  # [layers, 2, slots, Hkv, D]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    block_size: int
    num_decode: int  # the first num_decode packed tokens are single-token queries
    decode_tables: torch.Tensor | None
    decode_context_lens: torch.Tensor | None
    # decode rows [start, end) whose block tables are at most `width` long: attending per bucket
    # avoids padding every sequence to the longest one (long-tailed lengths)
    decode_buckets: list[tuple[int, int, int]]
    prefill_tables: torch.Tensor | None
    prefill_context_lens: torch.Tensor | None
    prefill_query_lens: torch.Tensor | None
    _plans: dict = field(default_factory=dict)

    def plan(self, group, window: int | None) -> VarlenPlan:
        key = (group, window)
        if key not in self._plans:
            if isinstance(group, tuple):  # ("decode", start, end, width)
                _, start, end, width = group
                lens = self.decode_context_lens[start:end]
                self._plans[key] = build_varlen_plan(
                    self.decode_tables[start:end, :width], lens, torch.ones_like(lens), self.block_size, window
                )
            else:
                self._plans[key] = build_varlen_plan(
                    self.prefill_tables, self.prefill_context_lens, self.prefill_query_lens, self.block_size, window
                )
        return self._plans[key]


def _decode_attention(q, k_cache, v_cache, ctx: StepContext, scale: float, window: int | None) -> torch.Tensor:
    if q.is_cuda and window is None and ctx.block_size & (ctx.block_size - 1) == 0:
        from areal.kernels.paged_attention_triton import paged_attention_decode_triton

        return paged_attention_decode_triton(
            q, k_cache, v_cache, ctx.decode_tables, ctx.decode_context_lens, scale, ctx.block_size
        )
    parts = [
        paged_attention_planned(q[start:end], k_cache, v_cache, ctx.plan(("decode", start, end, width), window), scale)
        for start, end, width in ctx.decode_buckets
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    paged_ctx: StepContext | None = None,
    **kwargs,
):
    """transformers attention-interface function. query [1, H, T, D], key/value [1, Hkv, T, D]."""
    if paged_ctx is None:
        raise RuntimeError("areal_paged attention needs paged_ctx (run the model through ModelRunner)")
    ctx = paged_ctx
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    layer_kv = ctx.kv[module.layer_idx]
    k_cache, v_cache = layer_kv[0], layer_kv[1]
    if q.is_cuda:
        from areal.kernels.paged_attention_triton import write_kv_cache_triton

        write_kv_cache_triton(k, v, k_cache, v_cache, ctx.slot_mapping)
    else:
        write_kv_cache(k, v, k_cache, v_cache, ctx.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    nd = ctx.num_decode
    parts = []
    if nd:
        parts.append(_decode_attention(q[:nd], k_cache, v_cache, ctx, scale, sliding_window))
    if nd < q.shape[0]:
        parts.append(paged_attention_planned(q[nd:], k_cache, v_cache, ctx.plan("prefill", sliding_window), scale))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL_NAME, paged_attention_forward)


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self._areal_packed_weight, self.bias, "none", [], "")


def _can_prepack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def prepack_linears(model: nn.Module) -> list[nn.Linear]:
    """CPU: run every nn.Linear of (our private copy of) the model through oneDNN with its weight
    pre-reordered once (what vLLM's CPU backend does): 20-40% faster small-batch GEMMs than
    F.linear. The module keeps its plain weight (for weight updates); call repack after loading."""
    # small matrices (e.g. the 0.5M-param default model) are faster through plain F.linear
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= PREPACK_MIN_WEIGHT]
    for mod in linears:
        mod.forward = types.MethodType(_packed_linear_forward, mod)
    repack(linears)
    return linears


@torch.no_grad()
def repack(linears: list[nn.Linear]) -> None:
    for mod in linears:
        mod._areal_packed_weight = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), 64)


def decode_buckets(table_lengths: list[int], block_size: int, token_bytes: int,
                   gather_bytes: int = DECODE_GATHER_BYTES) -> list[tuple[int, int, int]]:
    """(start, end, width) runs of the decode rows (sorted by block-table length): a run ends before a table
    DECODE_BUCKET_GROWTH times its first, or before its gathered K and V (rows x width blocks x block_size
    tokens x `token_bytes`) would pass `gather_bytes`."""
    buckets, start = [], 0
    for i in range(1, len(table_lengths) + 1):
        if (i == len(table_lengths) or table_lengths[i] > DECODE_BUCKET_GROWTH * max(1, table_lengths[start])
                or (i + 1 - start) * table_lengths[i] * block_size * token_bytes > gather_bytes):
            buckets.append((start, i, max(table_lengths[start:i])))
            start = i
    return buckets


def _pad_tables(tables: list[list[int]], device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)


class ModelRunner:
    def __init__(
        self, model: nn.Module, num_blocks: int, block_size: int, copy_model: bool = True, cpu_prepack: bool = True
    ) -> None:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"areal Engine does not support model type {model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        _register()
        if copy_model:
            model = copy.deepcopy(model)  # setting the attention implementation must not affect the caller's model
        model.eval()
        model.set_attn_implementation(ATTN_IMPL_NAME)
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        cfg = model.config
        self.config = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv = torch.zeros(
            cfg.num_hidden_layers, 2, num_blocks * block_size, num_kv, head_dim, dtype=self.dtype, device=self.device
        )
        self._kv_token_bytes = 2 * num_kv * head_dim * self.kv.element_size()  # one layer's K and V of a token
        self._packed = prepack_linears(model) if cpu_prepack and _can_prepack(model) else []
        self._packed_stale = False
        # remove_duplicate=False: a tied lm_head.weight is addressable under both names
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._params.update(dict(model.named_buffers(remove_duplicate=False)))

    def kv_cache_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        bs = self.block_size
        view = self.kv.view(self.kv.shape[0], 2, self.num_blocks, bs, *self.kv.shape[3:])
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        view[:, :, dst] = view[:, :, src]  # gathers every source before any write

    @torch.inference_mode()
    def run(self, seqs, num_new: list[int], sample_mask: list[bool]) -> torch.Tensor:
        """One forward over the scheduled chunks. Sequences with num_new == 1 must come first
        (best sorted by block-table length: they are attended in buckets of similar length).
        Returns float32 logits [num_sampling, V] for the sequences flagged in sample_mask (in order)."""
        if self._packed_stale:
            repack(self._packed)
            self._packed_stale = False
        device = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        tables = []
        context_lens = []
        num_decode = 0
        for seq, n in zip(seqs, num_new):
            start = seq.num_computed
            if n == 1:
                num_decode += 1
                input_ids.append(seq.token_ids[start])
                positions.append(start)
            else:
                input_ids.extend(seq.token_ids[start : start + n])
                positions.extend(range(start, start + n))
            tables.append(seq.block_table)
            context_lens.append(start + n)
        num_seqs = len(seqs)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=device)
        tables_t = _pad_tables(tables, device)
        lens_t = torch.tensor(context_lens, dtype=torch.long, device=device)
        qlens_t = torch.tensor(num_new, dtype=torch.long, device=device)
        token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), qlens_t)
        bs = self.block_size
        slot_mapping = tables_t[token_seq, pos_t // bs] * bs + pos_t % bs
        ctx = StepContext(
            decode_buckets=decode_buckets([len(t) for t in tables[:num_decode]], bs, self._kv_token_bytes),
            kv=self.kv,
            slot_mapping=slot_mapping,
            block_size=bs,
            num_decode=num_decode,
            decode_tables=tables_t[:num_decode] if num_decode else None,
            decode_context_lens=lens_t[:num_decode] if num_decode else None,
            prefill_tables=tables_t[num_decode:] if num_decode < num_seqs else None,
            prefill_context_lens=lens_t[num_decode:] if num_decode < num_seqs else None,
            prefill_query_lens=qlens_t[num_decode:] if num_decode < num_seqs else None,
        )
        out = self.decoder(
            input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False, paged_ctx=ctx
        ).last_hidden_state[0]
        last_rows = torch.cumsum(qlens_t, 0) - 1
        rows = last_rows[torch.tensor(sample_mask, dtype=torch.bool, device=device)]
        return self.lm_head(out[rows]).float()

    @torch.no_grad()
    def load_weights(self, named_tensors) -> int:
        """Copy (name, tensor) pairs into the model in place. Returns how many were loaded."""
        count = 0
        for name, tensor in named_tensors:
            target = self._params.get(name)
            if target is None:
                raise KeyError(f"unknown weight {name!r} for {type(self.model).__name__}")
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            count += 1
        self._packed_stale = bool(self._packed)  # re-reorder the oneDNN weights before the next forward
        return count
