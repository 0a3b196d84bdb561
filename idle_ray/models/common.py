"""Pieces shared by the ID sequential models: padding layout and the scoring head.

Layout (fixed by the data layer): ``history`` is a LongTensor ``(B, T)`` left-padded with 0,
so the most recent item sits at column ``T - 1``; items are ``1..N`` and every item table has
``N + 1`` rows with row 0 the padding row. Functions here are plain functions (compose, don't
inherit); each model calls them from its own methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PAD_ID = 0


def real_item_mask(history: Tensor) -> Tensor:
    """``(B, T)`` bool, True where ``history`` holds a real item (not padding)."""
    return history != PAD_ID


def positions_from_start(history: Tensor) -> Tensor:
    """``(B, T)`` long: index of each real item counted from the first real item of its row.

    With left padding this gives the most recent item of a length-``n`` sequence position
    ``n - 1``, exactly the position RecBole's right-padded ``arange(T)`` gives it. Padding
    columns get 0 (their value never reaches a real position).
    """
    mask = real_item_mask(history)
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, T)


def left_to_right_index(history: Tensor) -> tuple[Tensor, Tensor]:
    """Gather indices that move the padding of each row from the left end to the right end.

    Returns ``(to_right, to_left)``, both ``(B, T)`` long: ``history.gather(1, to_right)`` is the
    right-padded layout (real items first), and ``right.gather(1, to_left)`` (applied along the
    time dimension) takes a right-padded result back to the left-padded layout. Recurrent models
    use it so padding comes after the real items and cannot leak into their states.
    """
    batch, length = history.shape
    num_pads = length - real_item_mask(history).sum(dim=1, keepdim=True)  # (B, 1)
    steps = torch.arange(length, device=history.device).unsqueeze(0)  # (1, T)
    to_right = (steps + num_pads) % length  # (B, T)
    to_left = (steps - num_pads) % length  # (B, T)
    return to_right, to_left


def full_sort_scores(user_state: Tensor, item_table: Tensor) -> Tensor:
    """Scores ``(B, N + 1)`` = ``user_state (B, d) @ item_table (N + 1, d).T``; column 0 is -inf."""
    scores = user_state @ item_table.transpose(0, 1)  # (B, N + 1)
    scores[:, PAD_ID] = float("-inf")
    return scores


def next_item_loss(user_state: Tensor, item_table: Tensor, target: Tensor) -> Tensor:
    """Full-softmax cross-entropy of ``target`` (B,) in ``1..N`` over items ``1..N`` only.

    Unlike RecBole, the padding row is not a class: it can never be a target, so keeping it in
    the softmax would only add a spurious logit.
    """
    logits = user_state @ item_table[PAD_ID + 1 :].transpose(0, 1)  # (B, N)
    return F.cross_entropy(logits, target - 1)
