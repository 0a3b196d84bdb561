"""The IDLE-Adapter's output head: read-out state -> scores over all items (``W_o``, ``b_o``, item bias)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OutputHead(nn.Module):
    """``z = W_o r + b_o`` and ``scores = z · item_tableᵀ + item_bias``, padding column ``-inf``.

    The item bias lives here (not loose on the container) so that it is used inside a module
    forward, where DeepSpeed ZeRO-3 gathers a partitioned parameter.

    Args:
        hidden_size: ``D``, width of the read-out state.
        id_dim: ``d``, width of the ID model's item table.
        num_rows: ``N + 1``, rows of the item table.
        use_item_bias: add a trainable per-item bias (zero-initialised).
    """

    def __init__(self, hidden_size: int, id_dim: int, num_rows: int, use_item_bias: bool, zero_init: bool = False):
        super().__init__()
        self.proj = nn.Linear(hidden_size, id_dim)  # W_o, b_o
        if zero_init:  # score fusion: the head starts as "no correction" of the ID model's state
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.item_bias = nn.Parameter(torch.zeros(num_rows)) if use_item_bias else None

    def forward(self, readout: Tensor, item_table: Tensor, user_state: Tensor | None = None) -> Tensor:
        """``readout (B, D)``, ``item_table (N + 1, d)``, optional fused ``user_state (B, d)`` ->
        ``scores (B, N + 1)``."""
        z = self.proj(readout.to(self.proj.weight.dtype))  # (B, d)
        if user_state is not None:
            z = user_state.to(z.dtype) + z
        scores = z @ item_table.to(z.dtype).transpose(0, 1)  # (B, N + 1)
        if self.item_bias is not None:
            scores = scores + self.item_bias.to(scores.dtype)
        pad = torch.zeros_like(scores[0], dtype=torch.bool)
        pad[0] = True
        return scores.masked_fill(pad, float("-inf"))
