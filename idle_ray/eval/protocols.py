"""Evaluation protocols: which candidates the target is ranked against.

- ``full``: all items 1..N, the user's earlier items excluded (the target never is). The
  protocol we select and report on.
- ``unmasked``: all items 1..N, nothing excluded (RecBole 1.2.1's rule for sequential models:
  earlier items stay rankable), for comparison with RecBole's published benchmarks.
- ``sampled``: the target + 99 negatives (common in older papers; for comparability only).
- ``llara``: the target + 19 negatives, reported as HR@1 (the LLaRA paper's protocol).

Negatives are drawn uniformly without replacement from items 1..N minus the user's earlier
items and the target, with ``np.random.default_rng([seed, user_id])``: a user's candidates
depend only on (seed, user, the set of earlier items, target), never on batching, order, or
which worker evaluates the user. "Earlier items" means every item the user interacted with
before the target, not the model's input window cut to ``max_len``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from idle_ray.eval.metrics import HR_KS, MRR_KS, NDCG_KS, target_ranks

NUM_NEGATIVES: dict[str, int | None] = {"full": None, "unmasked": None, "sampled": 99, "llara": 19}
# metrics worth reporting per protocol (with 20 candidates, HR@20 is always 1)
REPORTED_METRICS: dict[str, tuple[str, ...]] = {
    "full": tuple(f"hr@{k}" for k in HR_KS) + tuple(f"ndcg@{k}" for k in NDCG_KS) + ("mrr",),
    "unmasked": tuple(f"hr@{k}" for k in HR_KS) + tuple(f"ndcg@{k}" for k in NDCG_KS) + ("mrr",)
    + tuple(f"mrr@{k}" for k in MRR_KS),
    "sampled": tuple(f"hr@{k}" for k in HR_KS) + tuple(f"ndcg@{k}" for k in NDCG_KS) + ("mrr",),
    "llara": ("hr@1",),
}

# Draw in chunks of this many per needed negative: one chunk nearly always suffices when
# fewer than half the items are excluded. Fixed, because the stream must not depend on the batch.
_OVERDRAW = 2


def _item_set(items, num_items: int) -> np.ndarray:
    """Sorted unique ids in 1..N from a 1-D array/list/tensor (padding 0 and junk dropped)."""
    if isinstance(items, Tensor):
        items = items.detach().cpu().numpy()
    items = np.unique(np.asarray(items, dtype=np.int64).reshape(-1))
    return items[(items >= 1) & (items <= num_items)]


def exclusion_mask(seen: Sequence, num_items: int, device: torch.device | str | None = None) -> Tensor:
    """(B, N + 1) bool, True at every item in ``seen[b]`` (a 1-D int array per user) and at
    column 0 (padding). Padding ids in ``seen`` are ignored."""
    sets = [_item_set(items, num_items) for items in seen]
    mask = np.zeros((len(sets), num_items + 1), dtype=bool)
    rows = np.repeat(np.arange(len(sets)), [items.size for items in sets])
    mask[rows, np.concatenate(sets) if sets else np.empty(0, np.int64)] = True
    mask[:, 0] = True
    return torch.from_numpy(mask).to(device)


def _sample_negatives(rng: np.random.Generator, excluded: np.ndarray, num_negatives: int, num_items: int) -> np.ndarray:
    """``num_negatives`` distinct uniform draws from 1..N minus ``excluded`` (sorted unique)."""
    if num_items - excluded.size < num_negatives:
        raise ValueError(
            f"only {num_items - excluded.size} items are left to sample {num_negatives} negatives from"
        )
    if 2 * excluded.size <= num_items:
        # rejection sampling: the first k distinct allowed values of an i.i.d. uniform stream
        # are a uniform k-subset; cheap because most draws are allowed
        chosen = np.empty(0, dtype=np.int64)
        while chosen.size < num_negatives:
            draw = rng.integers(1, num_items + 1, size=_OVERDRAW * num_negatives + 16)
            pool = np.concatenate([chosen, draw[~np.isin(draw, excluded)]])
            _, first = np.unique(pool, return_index=True)
            chosen = pool[np.sort(first)]
        return chosen[:num_negatives]
    allowed = np.setdiff1d(np.arange(1, num_items + 1), excluded, assume_unique=True)
    return rng.choice(allowed, size=num_negatives, replace=False)


def sample_candidates(
    user_ids: Sequence[int] | Tensor | np.ndarray,
    histories: Sequence,
    targets: Sequence[int] | Tensor | np.ndarray,
    num_negatives: int,
    num_items: int,
    seed: int,
) -> Tensor:
    """Candidates (B, 1 + num_negatives) LongTensor: the target in column 0, then negatives.

    Args:
        user_ids: (B,) non-negative user ids (seed the per-user generator).
        histories: B 1-D int arrays/tensors, the user's earlier items (padding 0 allowed).
        targets: (B,) item ids in 1..N.
        num_negatives: negatives per user (99 for ``sampled``, 19 for ``llara``).
        num_items: N.
        seed: protocol seed; the same (seed, user) always gives the same negatives.
    """
    user_ids = np.asarray(user_ids.cpu() if isinstance(user_ids, Tensor) else user_ids, dtype=np.int64)
    targets = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets, dtype=np.int64)
    if not (len(user_ids) == len(histories) == len(targets)):
        raise ValueError("user_ids, histories and targets must have the same length")
    rows = np.empty((len(targets), 1 + num_negatives), dtype=np.int64)
    for row, (user, history, target) in enumerate(zip(user_ids, histories, targets)):
        excluded = np.union1d(_item_set(history, num_items), [target])
        rng = np.random.default_rng([seed, int(user)])
        rows[row, 0] = target
        rows[row, 1:] = _sample_negatives(rng, excluded, num_negatives, num_items)
    return torch.from_numpy(rows)


def candidate_ranks(scores: Tensor, candidates: Tensor | None = None) -> Tensor:
    """0-based rank of the target among its candidates, ties pessimistic.

    Either ``scores`` (B, N + 1) over all items with ``candidates`` (B, C) item ids (target in
    column 0), or ``scores`` (B, C) already restricted to the candidates (target in column 0)
    with ``candidates=None``. Returns (B,) LongTensor.
    """
    if candidates is not None:
        scores = scores.gather(1, candidates.to(scores.device))  # (B, C)
    # "not below" so NaN scores count against the target, as in target_ranks
    return (~(scores[:, 1:] < scores[:, :1])).sum(dim=1)


def protocol_ranks(
    protocol: str,
    scores: Tensor,
    targets: Tensor,
    histories: Sequence,
    user_ids: Sequence[int] | Tensor | np.ndarray | None = None,
    seed: int = 0,
) -> Tensor:
    """Ranks (B,) of ``targets`` under ``protocol`` from full scores (B, N + 1).

    ``histories`` are the users' earlier items (excluded under ``full``, never sampled as
    negatives otherwise); ``user_ids`` and ``seed`` are needed by the sampled protocols.
    """
    if protocol not in NUM_NEGATIVES:
        raise ValueError(f"unknown protocol {protocol!r}; choices: {', '.join(NUM_NEGATIVES)}")
    num_items = scores.size(1) - 1
    num_negatives = NUM_NEGATIVES[protocol]
    if protocol == "unmasked":
        return target_ranks(scores, targets)
    if num_negatives is None:
        return target_ranks(scores, targets, exclusion_mask(histories, num_items, scores.device))
    if user_ids is None:
        raise ValueError(f"protocol {protocol!r} samples negatives per user: pass user_ids")
    candidates = sample_candidates(user_ids, histories, targets, num_negatives, num_items, seed)
    return candidate_ranks(scores, candidates)
