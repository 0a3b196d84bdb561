"""SASRec: self-attentive sequential recommender (Kang & McAuley, ICDM 2018).

Architecture and defaults follow RecBole 1.2.1 (``recbole/model/sequential_recommender/sasrec.py``
and ``recbole/properties/model/SASRec.yaml``):

- item embedding (shared by the input and the output/scoring side) + learned positional
  embedding -> LayerNorm (eps 1e-12) -> dropout -> ``num_layers`` post-LN Transformer layers
  (multi-head self-attention, then a GELU (erf form) feed-forward of width ``inner_size``; each
  sub-layer is ``LayerNorm(x + dropout(sublayer(x)))``);
- init: every Linear/Embedding weight ~ N(0, 0.02), biases 0, LayerNorm (1, 0);
- defaults hidden 64, 2 layers, 2 heads, inner 256, ``dropout`` (RecBole ``hidden_dropout_prob``)
  0.5 and ``attn_dropout`` (RecBole ``attn_dropout_prob``) 0.5. These are RecBole's shipped
  defaults, kept so our ID-only baseline numbers are comparable with RecBole runs; tune them
  per dataset (0.2 is common for ML-1M) through the builder.

Our choices where we differ from RecBole, and why:

- Left padding instead of right padding. Positional embeddings count from the first real item
  of each row (``positions_from_start``), so every real item gets exactly the position index
  RecBole gives it for the same sequence (the most recent item of a length-n sequence gets
  position n - 1). Padded positions are masked out as keys, so ``user_state`` does not depend
  on how much padding there is.
- Attention goes through ``F.scaled_dot_product_attention`` with a boolean causal and
  key-padding mask (RecBole adds -10000 to the scores). Every query may also attend to itself,
  so fully padded query rows stay finite instead of softmaxing over an empty set (NaN on older
  PyTorch and some GPU kernels); real rows are unaffected because their own key is a real item
  anyway. Query, key and value
  projections are one fused Linear (same init distribution).
- The padding row of the item table is zero (RecBole re-initialises it); the loss and the
  scores exclude it (see ``common.next_item_loss`` / ``common.full_sort_scores``).
- ``user_states`` returns 0 at padded positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idle_ray.models.common import (
    PAD_ID,
    full_sort_scores,
    next_item_loss,
    positions_from_start,
    real_item_mask,
)


class _TransformerLayer(nn.Module):
    """RecBole's post-LN Transformer layer, with SDPA as the attention kernel."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        inner_size: int,
        dropout: float,
        attn_dropout: float,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.attn_out_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden_size, inner_size)
        self.ffn_out = nn.Linear(inner_size, hidden_size)
        self.ffn_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """``x`` (B, T, d), ``attn_mask`` (B, 1, T, T) bool (True = may attend) -> (B, T, d)."""
        batch, length, width = x.shape
        q, k, v = (
            self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        )  # each (B, h, T, d/h)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, h, T, d/h)
        context = context.transpose(1, 2).reshape(batch, length, width)  # (B, T, d)
        x = self.attn_norm(x + self.attn_out_dropout(self.attn_out(context)))
        hidden = self.ffn_out(F.gelu(self.ffn_in(x)))  # (B, T, d)
        return self.ffn_norm(x + self.ffn_dropout(hidden))


class SASRec(nn.Module):
    """Causal self-attention over the item history; scores are dot products with the item table.

    Args:
        num_items: number of real items N (ids ``1..N``; 0 is padding).
        hidden_size: d, width of item/position embeddings and of every layer.
        max_len: longest history (positional table size); longer inputs are cut to the most
            recent ``max_len`` items in ``user_state``.
        num_layers, num_heads, inner_size: Transformer depth, heads, feed-forward width.
        dropout: dropout on the embeddings and after each sub-layer (RecBole hidden_dropout_prob).
        attn_dropout: dropout on attention probabilities (RecBole attn_dropout_prob).
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: std of the normal init of Linear/Embedding weights.
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        max_len: int = 50,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        inner_size: int = 256,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.initializer_range = initializer_range
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD_ID)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.embedding_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            _TransformerLayer(hidden_size, num_heads, inner_size, dropout, attn_dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def user_states(self, history: Tensor) -> Tensor:
        """``history`` (B, T) left-padded -> (B, T, d); position t sees only items at <= t.

        The real length of every row must be <= ``max_len`` (positions count from the first
        real item); padded positions get 0.
        """
        mask = real_item_mask(history)  # (B, T)
        length = history.size(1)
        if length > self.max_len and int(mask.sum(dim=1).max()) > self.max_len:
            raise ValueError(f"history has more than max_len={self.max_len} real items; cut it first")
        positions = positions_from_start(history)  # (B, T)
        x = self.item_embedding(history) + self.position_embedding(positions)  # (B, T, d)
        x = self.embedding_dropout(self.embedding_norm(x))
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()  # (T, T)
        self_only = torch.eye(length, dtype=torch.bool, device=history.device)  # (T, T)
        # keys: real items at or before the query, plus the query itself (keeps pad rows finite)
        attn_mask = (causal & (mask.unsqueeze(1) | self_only)).unsqueeze(1)  # (B, 1, T, T)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x * mask.unsqueeze(-1).to(x.dtype)  # (B, T, d)

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
