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
  P, P+1, ... and attending to the prompt and to itself only. The prompt's hidden states
  are computed once and receive the summed gradient of every completion, so log-probs, loss
  and gradients equal the unshared layout exactly, on P + sum(C_k) tokens instead of
  G * P + sum(C_k).

Attention stays inside each sequence: either transformers' own sdpa/eager path (it detects
the position-id resets when attention_mask is None and builds a block-diagonal causal mask,
N x N work), or the `areal_varlen` attention registered below, which runs an
`AttentionLayout` built at packing time (the CPU analogue of flash-attn varlen). Its blocks:

* causal: a lone sequence, or a group's prompt: its tokens attend causally to themselves;
* prefixed: completion k of a group: its C_k tokens attend to the prompt's P and causally
  to their own, C_k x (P + C_k) scores, never to another completion's.

Blocks of similar shape are padded into one batched SDPA call (`bucket_blocks`: at most
PADDING_SLACK times the blocks' own scores), so the work is ~ sum of the blocks' scores
(never the group's (P + sum C_k)^2) in a few calls per layer, not one per sequence.

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
    attention               packed: the `AttentionLayout` the varlen attention runs (None when
                            the model's own attention runs the packed row, or padded)
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
    attention: AttentionLayout | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def gather(self, per_target: Tensor) -> Tensor:
        """[S, T-1] batch tensor -> flat [n] values at this micro-batch's completion targets."""
        return per_target[self.target_row, self.target_col]


def sequence_lengths(attention_mask: Tensor) -> Tensor:
    """Tokens per right-padded row."""
    return attention_mask.sum(dim=1)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, rows: Tensor,
              blocked_attention: bool = True) -> MicroBatch:
    """Concatenate the valid tokens of `rows` (right-padded batch) into one packed row."""
    return pack_groups(input_ids, attention_mask, loss_mask, list(rows.split(1)), blocked_attention=blocked_attention)


def common_prefix_length(seqs: list[Tensor]) -> int:
    """Length of the longest common prefix of 1-D token tensors (the whole of a lone one)."""
    shortest = min(len(s) for s in seqs)
    if len(seqs) == 1:
        return shortest
    same = torch.stack([s[:shortest] for s in seqs]).eq(seqs[0][:shortest]).all(0)
    differ = torch.nonzero(~same, as_tuple=False)
    return int(differ[0]) if len(differ) else shortest


PADDING_SLACK = 2.0  # a call may compute up to twice its blocks' own scores (padding to its longest) ...
SMALL_CALL = 16384  # ... or any number below this many per head: on a CPU one more call costs more than that


@dataclass
class AttentionCall:
    """One batched SDPA call over n blocks, each padded to the call's q queries and k keys.

    query_index [n, q]  packed positions of each block's queries (a shorter block repeats its first)
    key_index   [n, k]  packed positions of its keys
    mask        [n, 1, q, k] bool (True = may attend), or None: the keys are the queries, causal
                (right padding is then exact: a real query row never reaches a padded key)
    valid       [n, q]  the real query rows
    """

    query_index: Tensor
    key_index: Tensor
    mask: Tensor | None
    valid: Tensor


@dataclass
class AttentionLayout:
    """A packed row's attention as a few calls; `restore` [N] puts the calls' real rows, concatenated, back in
    packed order."""

    calls: list[AttentionCall]
    restore: Tensor


def bucket_blocks(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of the blocks' (queries, keys) shapes in buckets of one call each: largest first, a block joins
    the current bucket while the padded call (blocks x longest queries x longest keys) stays within
    PADDING_SLACK times the bucket's own scores, or below SMALL_CALL."""
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0], -shapes[i][1], i))
    buckets: list[list[int]] = []
    q = k = own = 0
    for i in order:
        qi, ki = shapes[i]
        grown = (max(q, qi), max(k, ki), own + qi * ki)
        if buckets and (len(buckets[-1]) + 1) * grown[0] * grown[1] <= max(PADDING_SLACK * grown[2], SMALL_CALL):
            buckets[-1].append(i)
            q, k, own = grown
        else:
            buckets.append([i])
            q, k, own = qi, ki, qi * ki
    return buckets


def _padded(ranges: list[list[range]], width: int, device) -> Tensor:
    """[n, width] positions: each block's ranges concatenated, padded with its first position."""
    rows = []
    for parts in ranges:
        pos = [i for r in parts for i in r]
        rows.append(pos + [pos[0]] * (width - len(pos)))
    return torch.tensor(rows, dtype=torch.long, device=device)


def attention_layout(segments: list[tuple[int, int, list[int]]], device=None) -> AttentionLayout:
    """The layout of a packed row of segments (start, prefix length, own lengths of the completions), as
    `pack_groups` lays them out: [prefix, own_1, ..., own_G] from `start`. A segment without completions
    (a lone sequence, its whole length as the prefix) is one causal block."""
    causal: list[range] = []  # query (= key) positions
    prefixed: list[tuple[range, range]] = []  # (prefix positions, own positions)
    for start, prefix, owns in segments:
        if prefix:
            causal.append(range(start, start + prefix))
        at = start + prefix
        for own in owns:
            if own and prefix:
                prefixed.append((range(start, start + prefix), range(at, at + own)))
            elif own:
                causal.append(range(at, at + own))
            at += own
    calls, rows = [], []
    for bucket in bucket_blocks([(len(r), len(r)) for r in causal]):
        width = max(len(causal[i]) for i in bucket)
        index = _padded([[causal[i]] for i in bucket], width, device)
        valid = torch.arange(width, device=device)[None] < torch.tensor([len(causal[i]) for i in bucket], device=device)[:, None]
        calls.append(AttentionCall(index, index, None, valid))
        rows += [p for i in bucket for p in causal[i]]
    for bucket in bucket_blocks([(len(own), len(pre) + len(own)) for pre, own in prefixed]):
        q = max(len(prefixed[i][1]) for i in bucket)
        k = max(len(prefixed[i][0]) + len(prefixed[i][1]) for i in bucket)
        queries = _padded([[prefixed[i][1]] for i in bucket], q, device)
        keys = _padded([list(prefixed[i]) for i in bucket], k, device)
        prefix = torch.tensor([len(prefixed[i][0]) for i in bucket], device=device)[:, None, None]
        own = torch.tensor([len(prefixed[i][1]) for i in bucket], device=device)[:, None]
        row, col = torch.arange(q, device=device)[None, :, None], torch.arange(k, device=device)[None, None, :]
        mask = (col < prefix) | (col - prefix <= row)  # the whole prompt; its own tokens causally
        calls.append(AttentionCall(queries, keys, mask[:, None], torch.arange(q, device=device)[None] < own))
        rows += [p for i in bucket for p in prefixed[i][1]]
    restore = torch.empty(len(rows), dtype=torch.long, device=device)
    restore[torch.tensor(rows, dtype=torch.long, device=device)] = torch.arange(len(rows), device=device)
    return AttentionLayout(calls, restore)


def _group_prefix(input_ids: Tensor, lengths: Tensor, rows: Tensor) -> int:
    """Common prefix length of a group's rows (their valid tokens)."""
    return common_prefix_length([input_ids[r, : int(lengths[r])] for r in rows.tolist()])


def pack_groups(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, groups: list[Tensor],
                prefixes: list[int] | None = None, blocked_attention: bool = True) -> MicroBatch:
    """Pack whole groups (row index tensors), each group's common prefix stored once (module doc).
    `prefixes`: each group's common prefix length, if the caller already has it; `blocked_attention`:
    build the `AttentionLayout` the varlen attention runs."""
    lengths = sequence_lengths(attention_mask)
    device = input_ids.device
    if prefixes is None:
        prefixes = [_group_prefix(input_ids, lengths, rows) for rows in groups]
    ids, pos, segments, hidden_index, t_row, t_col, bounds = [], [], [], [], [], [], [0]
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
        # a lone sequence is one causal block: its whole length as the prefix
        segments.append((seg_start, prefix, [len(s) - prefix for s in seqs]) if len(seqs) > 1
                        else (seg_start, len(seqs[0]), []))
    return MicroBatch(
        rows=torch.cat(groups),
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(pos)[None],
        attention_mask=None,
        cu_seqlens=torch.tensor(bounds, dtype=torch.long, device=device),
        hidden_index=torch.cat(hidden_index),
        target_row=torch.cat(t_row),
        target_col=torch.cat(t_col),
        attention=attention_layout(segments, device) if blocked_attention else None,
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
    group_index: Tensor | None = None, blocked_attention: bool = True,
) -> list[MicroBatch]:
    """Split `rows` into micro-batches of <= max_tokens tokens (counted as the model sees them).

    Packed: balanced bins of real tokens. With `group_index` ([S] group of every row), rows
    of one group stay in one micro-batch and share their prompt (`pack_groups`). Padded:
    consecutive rows, each costing the batch width (the honest padded-to-longest layout).
    `blocked_attention`: packed micro-batches carry the `AttentionLayout` of the varlen attention
    (False when the model's own attention runs them).
    """
    if packed and group_index is not None:
        groups = [rows[group_index[rows] == g] for g in torch.unique(group_index[rows]).tolist()]
        lengths = sequence_lengths(attention_mask)
        prefixes = [_group_prefix(input_ids, lengths, g) for g in groups]
        cost = [p + int((lengths[g] - p).sum()) for g, p in zip(groups, prefixes)]  # tokens, prompt once
        return [pack_groups(input_ids, attention_mask, loss_mask, [groups[i] for i in b], [prefixes[i] for i in b],
                            blocked_attention) for b in balanced_partition(cost, max_tokens)]
    if packed:
        lengths = sequence_lengths(attention_mask)[rows].tolist()
        return [pack_rows(input_ids, attention_mask, loss_mask, rows[torch.tensor(b)], blocked_attention)
                for b in balanced_partition(lengths, max_tokens)]
    per_mb = max(1, max_tokens // input_ids.shape[1])
    return [pad_rows(input_ids, attention_mask, loss_mask, part) for part in rows.split(per_mb)]


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A packed row's attention as its `AttentionLayout` says (transformers attention API).

    query [1, H, N, D], key/value [1, H_kv, N, D]; the layout comes as `attention_mask`
    (`layout_argument`). Without one this is plain sdpa, so the same model still serves
    padded or unpacked calls. Returns [1, N, H, D].
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = attention_mask  # the decoder hands each layer its entry of `layout_argument`'s mapping
    if not isinstance(layout, AttentionLayout) or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q, k, v = query[0], key[0], value[0]
    rows = []
    for call in layout.calls:
        out = torch.nn.functional.scaled_dot_product_attention(  # [n, H, q, D]
            q[:, call.query_index].transpose(0, 1), k[:, call.key_index].transpose(0, 1),
            v[:, call.key_index].transpose(0, 1), attn_mask=call.mask, is_causal=call.mask is None, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=q.shape[0] != k.shape[0],
        )
        rows.append(out.transpose(1, 2)[call.valid])  # [real rows, H, D]
    return torch.cat(rows)[layout.restore][None], None


class _EveryLayerType(dict):
    """A prepared `attention_mask` mapping: transformers' decoders take a dict as given (one
    mask per layer type) and hand the entry to the attention function untouched."""

    def __init__(self, layout):
        super().__init__(full_attention=layout)  # non-empty: an empty dict would read as "no mask"
        self.layout = layout

    def __missing__(self, layer_type):
        return self.layout


def layout_argument(layout: AttentionLayout) -> dict:
    """The `attention_mask` argument that carries a packed row's layout to `varlen_sdpa_attention`
    (a plain keyword argument would be dropped by the decoder's forward)."""
    return _EveryLayerType(layout)


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask without padding (packed rows carry their `AttentionLayout` instead; an unpadded
    row: sdpa's is_causal); padded rows get sdpa's usual mask."""
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
