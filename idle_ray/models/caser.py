"""Caser: convolutional sequence embedding (Tang & Wang, WSDM 2018).

Follows RecBole 1.2.1 (``recbole/model/sequential_recommender/caser.py``, ``Caser.yaml``) with
the paper's window L = ``max_len`` = 5 by default (RecBole's benchmark: 50): the last L items form an
``L x d`` "image"; ``num_vertical`` (8; RecBole's Caser.yaml: 4) vertical filters of shape ``L x 1`` and,
for every height h in 1..L, ``num_horizontal`` (16; RecBole: 8) horizontal filters of shape ``h x d`` (ReLU, max-pooled over time) -> concat -> dropout (0.4)
-> ReLU(fc1) -> ReLU(fc2) = user state (d = ``hidden_size``, 64). Init as RecBole: embedding
N(0, 1/d), Linear xavier-normal with zero bias, Conv2d PyTorch default. ``calculate_loss`` adds
RecBole's L2 term ``reg_weight * sum ||W||_2`` over the item table, the vertical filters, fc1
and fc2 (RecBole's extra term on the horizontal filters is always 0 there, so it is left out).

Differences from RecBole, and why:

- No user embedding. The model contract gives only the history (the IDLE adapter needs a user
  state from the sequence alone, and held-out users must be scorable), so RecBole's
  ``fc2([z, user_emb])`` becomes ``fc2(z)`` with a ``d -> d`` layer.
- The window is the L most recent items with left padding, so the most recent item always
  sits in the last row of the image (RecBole feeds a right-padded list, which moves the most
  recent item for short sequences). Padding rows embed to zero.
- ``user_states`` computes, at every position t, the state of the window ending at t (unfold,
  so it costs T windows); padded positions get 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idle_ray.models.common import PAD_ID, full_sort_scores, next_item_loss, real_item_mask


class Caser(nn.Module):
    """Horizontal + vertical convolutions over the last ``max_len`` items.

    Args:
        num_items: number of real items N (ids ``1..N``; 0 is padding).
        hidden_size: d, width of the item embeddings and of the user state.
        max_len: window length L (number of most recent items the model reads).
        num_vertical: vertical filters (RecBole ``nv``).
        num_horizontal: horizontal filters per height (RecBole ``nh``).
        dropout: dropout on the concatenated convolution features.
        reg_weight: weight of the L2 term added by ``calculate_loss`` (0 turns it off).
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        max_len: int = 5,
        num_vertical: int = 8,
        num_horizontal: int = 16,
        dropout: float = 0.4,
        reg_weight: float = 1e-4,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.reg_weight = reg_weight
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD_ID)
        self.conv_v = nn.Conv2d(1, num_vertical, kernel_size=(max_len, 1))
        self.conv_h = nn.ModuleList(
            nn.Conv2d(1, num_horizontal, kernel_size=(height, hidden_size)) for height in range(1, max_len + 1)
        )
        self.fc1 = nn.Linear(num_vertical * hidden_size + num_horizontal * max_len, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.item_embedding.weight, 0.0, 1.0 / hidden_size)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()

    def _window_state(self, windows: Tensor) -> Tensor:
        """``windows`` (M, L) left-padded item ids -> (M, d) state."""
        image = self.item_embedding(windows).unsqueeze(1)  # (M, 1, L, d)
        vertical = self.conv_v(image).flatten(1)  # (M, nv * d)
        horizontal = [F.relu(conv(image).squeeze(3)).amax(dim=2) for conv in self.conv_h]  # L x (M, nh)
        features = self.dropout(torch.cat([vertical, *horizontal], dim=1))  # (M, nv * d + nh * L)
        return F.relu(self.fc2(F.relu(self.fc1(features))))  # (M, d)

    def user_states(self, history: Tensor) -> Tensor:
        """``history`` (B, T) left-padded -> (B, T, d); position t reads the window ending at t."""
        batch, length = history.shape
        padded = F.pad(history, (self.max_len - 1, 0), value=PAD_ID)  # (B, T + L - 1)
        windows = padded.unfold(1, self.max_len, 1)  # (B, T, L)
        states = self._window_state(windows.reshape(batch * length, self.max_len))  # (B * T, d)
        states = states.view(batch, length, -1)  # (B, T, d)
        return states * real_item_mask(history).unsqueeze(-1).to(states.dtype)

    def user_state(self, history: Tensor) -> Tensor:
        """(B, d) state of the window of the ``max_len`` most recent items."""
        windows = F.pad(history, (max(self.max_len - history.size(1), 0), 0), value=PAD_ID)
        return self._window_state(windows[:, -self.max_len :])  # (B, d)

    def item_table(self) -> Tensor:
        """(N + 1, d) item embeddings used for scoring; row 0 is padding."""
        return self.item_embedding.weight

    def full_sort_predict(self, history: Tensor) -> Tensor:
        """(B, N + 1) scores over all items; column 0 (padding) is -inf."""
        return full_sort_scores(self.user_state(history), self.item_table())

    def calculate_loss(self, history: Tensor, target: Tensor) -> Tensor:
        """Full-softmax CE of ``target`` (B,) over items 1..N plus RecBole's L2 term."""
        loss = next_item_loss(self.user_state(history), self.item_table(), target)
        if self.reg_weight:
            weights = (self.item_embedding.weight, self.conv_v.weight, self.fc1.weight, self.fc2.weight)
            loss = loss + self.reg_weight * sum(weight.norm(2) for weight in weights)
        return loss
