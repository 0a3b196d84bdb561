"""Top-K from full scores, in original item ids and titles: one rule for batch and online use.

Scores are ``(B, N + 1)`` over dense item ids (column 0 is padding and is never recommended).
With ``exclude_history`` (the default) the items a user already interacted with are masked, as
the ``full`` evaluation protocol does, so the lists hold new items only. Ties break towards the
lower dense id (``torch.topk`` on CPU is not stable, so the order is made explicit here).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from idle_ray.eval.protocols import exclusion_mask


class Vocabulary:
    """Dense ids <-> original ids and titles of a prepared dataset (index 0: padding)."""

    def __init__(self, prepared_path):
        items = pq.read_table(f"{prepared_path}/vocab/items.parquet").to_pydict()
        users = pq.read_table(f"{prepared_path}/vocab/users.parquet").to_pydict()
        n = len(items["item"])
        self.item_ids = np.empty(n + 1, dtype=object)
        self.titles = np.empty(n + 1, dtype=object)
        self.item_ids[items["item"]] = items["original_id"]
        self.titles[items["item"]] = items["title"]
        self.user_ids = np.empty(len(users["user"]) + 1, dtype=object)
        self.user_ids[users["user"]] = users["original_id"]
        self.item_index = {orig: i for i, orig in zip(items["item"], items["original_id"])}
        self.user_index = {orig: u for u, orig in zip(users["user"], users["original_id"])}

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1


def top_k(scores: torch.Tensor, k: int, seen: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(items (B, k) int64 dense ids, scores (B, k) float32)``, best first, padding and (when
    ``seen`` is given) each user's earlier items excluded; ties towards the lower id."""
    scores = scores.detach().float().cpu().clone()
    num_items = scores.size(1) - 1
    if seen is not None:
        scores[exclusion_mask(seen, num_items)] = float("-inf")
    scores[:, 0] = float("-inf")
    # stable order: sort by (-score, id) so equal scores keep the lower id first
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    top = scores.gather(1, order)
    return order.numpy().astype(np.int64), top.numpy().astype(np.float32)
