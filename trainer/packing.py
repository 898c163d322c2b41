"""Micro-batches under a token budget: balanced bin packing and packed (varlen) rows.

A step's sequences are split into micro-batches of at most `max_tokens` tokens each,
never padded to the longest sequence of the batch:

* `balanced_partition` picks the number of bins k = ceil(total / budget) and places the
  sequences longest first, each into the currently lightest bin (LPT, the greedy
  counterpart of Karmarkar-Karp balancing); if a bin overflows the budget it retries with
  k + 1 bins. Loads end up nearly equal, so no micro-batch is a straggler.
* `pack_rows` concatenates the chosen sequences into ONE row of N tokens with position
  ids restarting at 0 for each sequence.
* `pack_groups` does the same with whole GRPO groups, and stores each group's shared
  prompt ONCE: [prompt, completion_1, ..., completion_G], completion k at positions
  P, P+1, ... and attending to the prompt and to itself only (a per-group boolean mask).
  The prompt's hidden states are computed once and receive the summed gradient of every
  completion, so log-probs, loss and gradients equal the unshared layout exactly, on
  P + sum(C_k) tokens instead of G * P + sum(C_k). Attention stays inside each sequence: either
  transformers' own sdpa/eager path (it detects the position-id resets when
  attention_mask is None and builds a block-diagonal causal mask, N x N work), or the
  `areal_varlen` attention registered below, which runs causal SDPA segment by segment
  (sum of L_i^2 work instead of N^2; the CPU analogue of flash-attn varlen).

Every per-token tensor of a `TrainBatch` lives in its [S, T-1] target layout; a
micro-batch only says which rows it holds and where each row's completion targets sit
in the packed hidden states (`hidden_index`), so losses run on flat 1-D tensors with
`sequence_ids` = batch row.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

VARLEN_ATTENTION = "areal_varlen"


def balanced_partition(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` split into bins of total <= max_tokens with near-equal loads.

    A single item longer than the budget gets a bin of its own (it cannot be split).
    Bins are returned heaviest first; inside a bin, indices keep ascending order.
    """
    if max_tokens <= 0:
        raise ValueError("max_tokens must be > 0")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    oversized = [[i] for i in order if lengths[i] > max_tokens]
    rest = [i for i in order if lengths[i] <= max_tokens]
    bins: list[list[int]] = []
    if rest:
        k = max(1, -(-sum(lengths[i] for i in rest) // max_tokens))
        while True:
            bins, loads = _lpt(rest, lengths, k)
            if max(loads) <= max_tokens:
                break
            k += 1
        bins = [sorted(b) for _, b in sorted(zip(loads, bins), key=lambda x: -x[0]) if b]
    return oversized + bins


def _lpt(order: list[int], lengths: list[int], k: int) -> tuple[list[list[int]], list[int]]:
    """Longest-first greedy: each item (already sorted longest first) goes to the lightest bin."""
    heap = [(0, b) for b in range(k)]  # (load, bin id)
    bins: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in order:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        loads[b] = load + lengths[i]
        heapq.heappush(heap, (loads[b], b))
    return bins, loads


def split_balanced(lengths: list[int], parts: int) -> list[list[int]]:
    """Exactly `parts` groups of indices with near-equal total length (e.g. one per rank)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [sorted(b) for b in _lpt(order, lengths, parts)[0]]


@dataclass
class MicroBatch:
    """Model inputs for some rows of a batch, and where their completion targets are.

    rows         [b]        batch rows in this micro-batch
    input_ids    [R, W]     packed: R = 1, W = N tokens; padded: R = b, W = width
    position_ids [R, W]     restart at 0 for every sequence (packed) / None (padded)
    attention_mask [R, W]   None when packed (the position resets define the blocks)
    cu_seqlens   [b + 1]    sequence (or shared-prompt group) boundaries in the packed row
    segment_masks           per segment between cu_seqlens: None = plain causal, or the
                            [n, n] bool attention mask of a shared-prompt group
    hidden_index [n]        flat index into hidden.reshape(R * W, H) of each completion target
    target_row, target_col [n]  the same targets in the batch's [S, T-1] layout
    """

    rows: Tensor
    input_ids: Tensor
    position_ids: Tensor | None
    attention_mask: Tensor | None
    cu_seqlens: Tensor | None
    hidden_index: Tensor
    target_row: Tensor
    target_col: Tensor
    segment_masks: list[Tensor | None] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def gather(self, per_target: Tensor) -> Tensor:
        """[S, T-1] batch tensor -> flat [n] values at this micro-batch's completion targets."""
        return per_target[self.target_row, self.target_col]


def sequence_lengths(attention_mask: Tensor) -> Tensor:
    """Tokens per right-padded row."""
    return attention_mask.sum(dim=1)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, rows: Tensor) -> MicroBatch:
    """Concatenate the valid tokens of `rows` (right-padded batch) into one packed row."""
    return pack_groups(input_ids, attention_mask, loss_mask, list(rows.split(1)))


def common_prefix_length(seqs: list[Tensor]) -> int:
    """Length of the longest common prefix of 1-D token tensors (the whole of a lone one)."""
    shortest = min(len(s) for s in seqs)
    if len(seqs) == 1:
        return shortest
    same = torch.stack([s[:shortest] for s in seqs]).eq(seqs[0][:shortest]).all(0)
    differ = torch.nonzero(~same, as_tuple=False)
    return int(differ[0]) if len(differ) else shortest


def shared_prefix_mask(prefix: int, own_lengths: list[int], device=None) -> Tensor:
    """[n, n] bool, True = may attend: causal over the prefix; each continuation k sees the
    whole prefix and, causally, its own tokens (never another continuation's)."""
    n = prefix + sum(own_lengths)
    owner = torch.full((n,), -1, dtype=torch.long, device=device)  # -1 = prefix
    start = prefix
    for k, c in enumerate(own_lengths):
        owner[start:start + c] = k
        start += c
    idx = torch.arange(n, device=device)
    causal = idx[None, :] <= idx[:, None]
    visible = (owner[None, :] == -1) | (owner[None, :] == owner[:, None])
    return causal & visible


def _group_prefix(input_ids: Tensor, lengths: Tensor, rows: Tensor) -> int:
    """Common prefix length of a group's rows (their valid tokens)."""
    return common_prefix_length([input_ids[r, : int(lengths[r])] for r in rows.tolist()])


def pack_groups(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, groups: list[Tensor],
                prefixes: list[int] | None = None) -> MicroBatch:
    """Pack whole groups (row index tensors), each group's common prefix stored once (module doc).
    `prefixes`: each group's common prefix length, if the caller already has it."""
    lengths = sequence_lengths(attention_mask)
    device = input_ids.device
    if prefixes is None:
        prefixes = [_group_prefix(input_ids, lengths, rows) for rows in groups]
    ids, pos, masks, hidden_index, t_row, t_col, bounds = [], [], [], [], [], [], [0]
    for rows, prefix in zip(groups, prefixes):
        seqs = [input_ids[r, : int(lengths[r])] for r in rows.tolist()]
        seg_start = bounds[-1]
        ids.append(seqs[0][:prefix])
        pos.append(torch.arange(prefix, device=device))
        own_start = seg_start + prefix
        for r, seq in zip(rows.tolist(), seqs):
            own = len(seq) - prefix
            ids.append(seq[prefix:])
            pos.append(torch.arange(prefix, len(seq), device=device))
            cols = torch.nonzero(loss_mask[r, : max(len(seq) - 1, 0)], as_tuple=False).flatten()
            # hidden t predicts token t + 1: in the shared prefix below `prefix`, else in row r's own tokens
            hidden_index.append(torch.where(cols < prefix, seg_start + cols, own_start + cols - prefix))
            t_row.append(torch.full_like(cols, r))
            t_col.append(cols)
            own_start += own
        bounds.append(own_start)
        owns = [len(s) - prefix for s in seqs]
        masks.append(None if len(seqs) == 1 else shared_prefix_mask(prefix, owns, device))
    return MicroBatch(
        rows=torch.cat(groups),
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(pos)[None],
        attention_mask=None,
        cu_seqlens=torch.tensor(bounds, dtype=torch.long, device=device),
        hidden_index=torch.cat(hidden_index),
        target_row=torch.cat(t_row),
        target_col=torch.cat(t_col),
        segment_masks=masks if any(m is not None for m in masks) else None,  # None: plain per-sequence causal
    )


def pad_rows(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, rows: Tensor) -> MicroBatch:
    """The rows as they are: right-padded to the batch width (the unpacked baseline)."""
    ids = input_ids[rows]
    width = ids.shape[1]
    sel = loss_mask[rows].bool()
    local_row, col = torch.nonzero(sel, as_tuple=True)
    return MicroBatch(
        rows=rows,
        input_ids=ids,
        position_ids=None,
        attention_mask=attention_mask[rows],
        cu_seqlens=None,
        hidden_index=local_row * width + col,
        target_row=rows[local_row],
        target_col=col,
    )


def make_microbatches(
    input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, rows: Tensor, max_tokens: int, packed: bool = True,
    group_index: Tensor | None = None,
) -> list[MicroBatch]:
    """Split `rows` into micro-batches of <= max_tokens tokens (counted as the model sees them).

    Packed: balanced bins of real tokens. With `group_index` ([S] group of every row), rows
    of one group stay in one micro-batch and share their prompt (`pack_groups`). Padded:
    consecutive rows, each costing the batch width (the honest padded-to-longest layout).
    """
    if packed and group_index is not None:
        groups = [rows[group_index[rows] == g] for g in torch.unique(group_index[rows]).tolist()]
        lengths = sequence_lengths(attention_mask)
        prefixes = [_group_prefix(input_ids, lengths, g) for g in groups]
        cost = [p + int((lengths[g] - p).sum()) for g, p in zip(groups, prefixes)]  # tokens, prompt once
        return [pack_groups(input_ids, attention_mask, loss_mask, [groups[i] for i in b], [prefixes[i] for i in b])
                for b in balanced_partition(cost, max_tokens)]
    if packed:
        lengths = sequence_lengths(attention_mask)[rows].tolist()
        return [pack_rows(input_ids, attention_mask, loss_mask, rows[torch.tensor(b)])
                for b in balanced_partition(lengths, max_tokens)]
    per_mb = max(1, max_tokens // input_ids.shape[1])
    return [pad_rows(input_ids, attention_mask, loss_mask, part) for part in rows.split(per_mb)]


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention run separately on each packed sequence (transformers attention API).

    query [1, H, N, D], key/value [1, H_kv, N, D]; `cu_seq_lens_q` (the sequence boundaries)
    comes through the model's forward kwargs, and shared-prompt groups' masks (`pack_groups`)
    as `attention_mask` (`segment_mask_argument`). Without them this is plain sdpa, so the
    same model still serves padded or unpacked calls.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    bounds = cu.tolist()
    masks = attention_mask if isinstance(attention_mask, SegmentMasks) else [None] * (len(bounds) - 1)
    outs = []
    for s, e, mask in zip(bounds[:-1], bounds[1:], masks):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], attn_mask=mask, is_causal=mask is None, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=groups > 1,
        ))
    out = torch.cat(outs, dim=2)  # [1, H, N, D]
    return out.transpose(1, 2).contiguous(), None


class SegmentMasks(list):
    """Per packed segment: None (causal) or a shared-prompt group's [n, n] bool mask."""


class _EveryLayerType(dict):
    """A prepared `attention_mask` mapping: transformers' decoders take a dict as given (one
    mask per layer type) and hand the entry to the attention function untouched."""

    def __init__(self, mask):
        super().__init__(full_attention=mask)  # non-empty: an empty dict would read as "no mask"
        self.mask = mask

    def __missing__(self, layer_type):
        return self.mask


def segment_mask_argument(masks: list[Tensor | None]) -> dict:
    """The `attention_mask` argument that carries shared-prompt masks to `varlen_sdpa_attention`
    (a plain keyword argument would be dropped by the decoder's forward)."""
    return _EveryLayerType(SegmentMasks(masks))


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask without padding (packed rows: per-segment causal SDPA needs none; an
    unpadded row: sdpa's is_causal); padded rows get sdpa's usual mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register `areal_varlen` (attention + a no-op mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if VARLEN_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION
