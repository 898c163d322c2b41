"""The optional critic for PPO-GAE: a copy of the policy's decoder with a scalar value head.

V_t is read from the decoder's hidden state t, the same position whose logits predict
completion token t+1, so values line up with the batch's [S, T-1] target layout.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ValueModel(nn.Module):
    """decoder (deep copy of the policy's, trained separately) -> Linear(hidden, 1).

    The head starts at zero, so the first values are 0 and the first GAE advantages are
    the plain returns.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.decoder = copy.deepcopy(policy.get_decoder())
        self.head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(self.decoder.parameters()).dtype)

    def forward(self, input_ids, position_ids, attention_mask, hidden_index, **attn_kwargs) -> Tensor:
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              use_cache=False, **attn_kwargs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1])[hidden_index]
        return self.head(selected).squeeze(-1).float()


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> Tensor:
    """Per-token PPO value loss (flat tensors):

        L_t = 0.5 · max((V_t − R_t)^2, (V_old + clip(V_t − V_old, −c, c) − R_t)^2)
    with c = clip; clip <= 0 gives the unclipped 0.5 · (V_t − R_t)^2.
    """
    plain = (values - returns).square()
    if clip <= 0:
        return 0.5 * plain
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(plain, (clipped - returns).square())
