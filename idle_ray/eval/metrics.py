"""Ranking metrics for next-item prediction with one relevant item per user.

Ranks are 0-based: rank 0 means the target scored above every other candidate. Ties are
pessimistic: every other candidate whose score is >= the target's (or is NaN) ranks above it,
so a constant or broken model never looks good. With one relevant item:
``HR@k = [rank < k]``, ``NDCG@k = [rank < k] / log2(rank + 2)``, ``MRR = 1 / (rank + 1)``,
``MRR@k = [rank < k] / (rank + 1)`` (RecBole's MRR@10).

Evaluation is distributed, so metrics travel as sums: ``metric_sums`` per batch (float64, plus
``count``), ``merge_sums`` across batches and workers (plain addition, so the result does not
depend on how users were split), ``finalize`` once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from torch import Tensor

PAD_ID = 0
HR_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
MRR_KS = (10,)


def target_ranks(scores: Tensor, target: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based rank of each target among the non-excluded items, ties pessimistic.

    Args:
        scores: (B, N + 1) scores over items; column 0 (padding) never counts.
        target: (B,) item ids in 1..N.
        exclude: optional (B, N + 1) bool, True for items to leave out (e.g. the user's history).
            The target itself is never excluded, even if marked.
    Returns:
        (B,) LongTensor.
    """
    target = target.to(scores.device).long().unsqueeze(1)  # (B, 1)
    target_score = scores.gather(1, target)  # (B, 1)
    # "not below" rather than ">=" so that NaN scores (anywhere) count against the target
    above = ~(scores < target_score)  # (B, N + 1)
    above[:, PAD_ID] = False
    if exclude is not None:
        above &= ~exclude.to(above.device)
    above.scatter_(1, target, False)
    return above.sum(dim=1)


def per_user_metrics(ranks: Tensor | np.ndarray, ks_hr: Iterable[int] = HR_KS,
                     ks_ndcg: Iterable[int] = NDCG_KS) -> dict[str, np.ndarray]:
    """Each metric per user: ``{"hr@k" | "ndcg@k" | "mrr" | "mrr@10": (B,) float64}`` from ``ranks`` (B,)."""
    if isinstance(ranks, Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks, dtype=np.float64).reshape(-1)
    out = {f"hr@{k}": (ranks < k).astype(np.float64) for k in ks_hr}
    discount = 1.0 / np.log2(ranks + 2.0)
    out.update({f"ndcg@{k}": np.where(ranks < k, discount, 0.0) for k in ks_ndcg})
    out["mrr"] = 1.0 / (ranks + 1.0)
    out.update({f"mrr@{k}": np.where(ranks < k, out["mrr"], 0.0) for k in MRR_KS})
    return out


def metric_sums(ranks: Tensor | np.ndarray, ks_hr: Iterable[int] = HR_KS, ks_ndcg: Iterable[int] = NDCG_KS) -> dict:
    """Per-metric sums over ``ranks`` (B,) plus ``count``; float64 so merging stays exact enough."""
    per_user = per_user_metrics(ranks, ks_hr, ks_ndcg)
    sums = {key: float(values.sum()) for key, values in per_user.items()}
    sums["count"] = float(per_user["mrr"].size)
    return sums


def merge_sums(*sums: Mapping[str, float]) -> dict:
    """Add metric sums (from batches or workers) key by key; all must have the same keys."""
    keys = set(sums[0])
    for part in sums[1:]:
        if set(part) != keys:
            raise ValueError(f"cannot merge metric sums with different keys: {sorted(keys)} vs {sorted(part)}")
    return {key: float(sum(part[key] for part in sums)) for key in sums[0]}


def finalize(sums: Mapping[str, float], count: float | None = None) -> dict:
    """Means from sums; ``count`` defaults to ``sums["count"]``. Returns metrics without count."""
    count = sums["count"] if count is None else count
    if count <= 0:
        raise ValueError("cannot finalize metrics over zero users")
    return {key: value / count for key, value in sums.items() if key != "count"}


def ranking_metrics(
    ranks: Tensor | np.ndarray, ks_hr: Iterable[int] = HR_KS, ks_ndcg: Iterable[int] = NDCG_KS
) -> dict:
    """Means over the batch: ``hr@k`` for ``ks_hr``, ``ndcg@k`` for ``ks_ndcg``, and ``mrr``."""
    return finalize(metric_sums(ranks, ks_hr, ks_ndcg))

