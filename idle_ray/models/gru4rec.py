"""GRU4Rec: recurrent session/sequential recommender (Hidasi et al. 2016; Tan et al. 2016).

Follows RecBole 1.2.1 (``recbole/model/sequential_recommender/gru4rec.py``, ``GRU4Rec.yaml``):
item embedding (d = ``hidden_size``, 64) -> dropout (0.3) -> GRU without bias (1 layer, width
``gru_size`` 128) -> Linear back to d; the item embedding is also the scoring table. Init as
RecBole: embedding xavier-normal, GRU input/recurrent weights xavier-uniform, the Linear keeps
PyTorch's default.

Naming: ``hidden_size`` is d, the width of the user state and the item table, the same meaning
it has in SASRec and Caser (RecBole calls it ``embedding_size``); the GRU's own width is
``gru_size`` (RecBole's ``hidden_size``, default 128).

Padding: the batch is left-padded, and a GRU run over that layout would read the pads first,
making the state depend on the amount of padding. Each row is rotated so its real items come
first (RecBole's right-padded layout), the GRU runs once over the batch, and its outputs are
rotated back; states at real positions then never see a pad. (A bias-free GRU fed the zero
padding row keeps its state at exactly 0, so leading pads would be harmless too, but only while
row 0 stays zero: RecBole's init overwrites it, so its checkpoints carry a non-zero row. The
rotation keeps the invariance unconditional for one gather.) Padded positions get 0 in
``user_states``. The padding row of the item table is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from idle_ray.models.common import (
    PAD_ID,
    full_sort_scores,
    left_to_right_index,
    next_item_loss,
    real_item_mask,
)


class GRU4Rec(nn.Module):
    """GRU over the item history; scores are dot products with the item table.

    Args:
        num_items: number of real items N (ids ``1..N``; 0 is padding).
        hidden_size: d, width of the item embeddings and of the user state.
        max_len: longest history used; ``user_state`` reads the most recent ``max_len`` items.
        num_layers: stacked GRU layers.
        dropout: dropout on the input item embeddings.
        gru_size: width of the GRU hidden state.
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        max_len: int = 50,
        num_layers: int = 1,
        dropout: float = 0.3,
        gru_size: int = 128,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD_ID)
        self.embedding_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden_size, gru_size, num_layers=num_layers, bias=False, batch_first=True)
        self.dense = nn.Linear(gru_size, hidden_size)
        nn.init.xavier_normal_(self.item_embedding.weight)
        for weight in self.gru.parameters():
            nn.init.xavier_uniform_(weight)  # weight_ih_l*, weight_hh_l* (no biases)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()

    def user_states(self, history: Tensor) -> Tensor:
        """``history`` (B, T) left-padded -> (B, T, d); position t sees only items at <= t."""
        mask = real_item_mask(history)  # (B, T)
        to_right, to_left = left_to_right_index(history)  # (B, T) each
        right_history = history.gather(1, to_right)  # (B, T), real items first
        x = self.embedding_dropout(self.item_embedding(right_history))  # (B, T, d)
        output, _ = self.gru(x)  # (B, T, gru_size)
        output = self.dense(output)  # (B, T, d)
        width = output.size(-1)
        output = output.gather(1, to_left.unsqueeze(-1).expand(-1, -1, width))  # (B, T, d), left layout
        return output * mask.unsqueeze(-1).to(output.dtype)

    def user_state(self, history: Tensor) -> Tensor:
        """(B, d) state at the last position: the read-out for the next item."""
        return self.user_states(history[:, -self.max_len :])[:, -1]

    def item_table(self) -> Tensor:
        """(N + 1, d) item embeddings used for scoring; row 0 is padding."""
        return self.item_embedding.weight

    def full_sort_predict(self, history: Tensor) -> Tensor:
        """(B, N + 1) scores over all items; column 0 (padding) is -inf."""
        return full_sort_scores(self.user_state(history), self.item_table())

    def calculate_loss(self, history: Tensor, target: Tensor) -> Tensor:
        """Full-softmax CE of ``target`` (B,) over items 1..N, read out at the last position."""
        return next_item_loss(self.user_state(history), self.item_table(), target)
