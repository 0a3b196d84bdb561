"""Model-ready samples from user sequences (pure numpy; runs inside Ray Data ``map_batches``).

For a user sequence ``s`` of length ``n`` (chronological, dense item ids):

* ``train``: targets at positions ``1 .. n-3`` (one sample per target position, RecBole-style
  prefix augmentation), or only the last ``targets_per_user`` of them;
* ``valid``: target ``s[n-2]``;  ``test``: target ``s[n-1]``;
* ``next``: the whole sequence as history, no target (``target`` 0): what to recommend next.

Each sample: ``user`` int32, ``history`` int32 ``(max_history,)`` left-padded with 0 (most
recent item in the last column), ``history_len`` int32, ``target`` int32, and for valid/test
``seen``: every item before the target (ragged), used to mask the user's earlier items in
full ranking and to exclude them from sampled negatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SPLITS = ("train", "valid", "test")
ALL_SPLITS = SPLITS + ("next",)  # "next": recommendations after the last item (no target)


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int32> column given as a pyarrow (Chunked)Array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = np.asarray(column.values, dtype=np.int32)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


@dataclass(frozen=True)
class Holdout:
    """Training targets the ID model does not pre-train on, drawn per user; the adapter trains on
    exactly them (out-of-sample ID states, DESIGN 5c).

    ``targets`` per user, drawn among the user's last ``window`` training targets with a key that
    depends only on ``(seed, user, position)`` (the same draw in every process, shard and run).
    The ID model still reads a held-out item as *input* to later positions; only the loss at it
    is dropped. ``adapter=True`` yields the held-out targets, ``False`` every other one.
    """
    targets: int
    window: int
    seed: int = 0
    adapter: bool = False

    def __post_init__(self):
        if self.targets < 1 or self.window < self.targets:
            raise ValueError(f"a Holdout needs 1 <= targets <= window, got {self.targets}, {self.window}")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fixed, well-spread hash of uint64 values (wraps by design)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_positions(starts: np.ndarray, lengths: np.ndarray, users: np.ndarray, h: Holdout) -> np.ndarray:
    """Flat indices of the held-out training targets of every user (see :class:`Holdout`), sorted."""
    hi = lengths - 3  # the last training target's position in the sequence
    lo = np.maximum(1, hi - h.window + 1)
    counts = np.maximum(hi - lo + 1, 0)
    rows = np.repeat(np.arange(len(starts)), counts)
    before = np.repeat(np.cumsum(counts) - counts, counts)
    rel = lo[rows] + np.arange(counts.sum()) - before
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(_mix64(np.full(len(rows), h.seed, np.uint64))
                            ^ np.asarray(users, np.uint64)[rows]) ^ rel.astype(np.uint64))
    order = np.lexsort((key, rows))  # by user, then key: the first `targets` of each user are drawn
    chosen = order[(np.arange(len(order)) - before) < h.targets]
    return np.sort(starts[rows[chosen]] + rel[chosen])


def heldout_count(lengths: np.ndarray, h: Holdout) -> np.ndarray:
    """Held-out targets per user (fewer than ``h.targets`` only for very short sequences)."""
    hi = lengths - 3
    return np.minimum(np.maximum(hi - np.maximum(1, hi - h.window + 1) + 1, 0), h.targets)


def target_positions(offsets: np.ndarray, split: str, targets_per_user: int = 0,
                     holdout: int | Holdout = 0, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row index of the user, flat index of the target) for every sample of ``split``.

    ``holdout`` (train only): an int N leaves out the last N training targets of every user (the ID
    model pre-trains without them; the adapter then trains on the last N, out of sample); a
    :class:`Holdout` (needs ``users``) leaves out, or with ``adapter=True`` keeps only, its draw.
    """
    starts, lengths = offsets[:-1], np.diff(offsets)
    if split == "valid":
        return np.arange(len(starts)), starts + lengths - 2
    if split == "test":
        return np.arange(len(starts)), starts + lengths - 1
    if split == "next":  # one past the last item: the history is the whole sequence
        return np.arange(len(starts)), starts + lengths
    if split != "train":
        raise ValueError(f"unknown split {split!r}; expected one of {ALL_SPLITS}")
    if isinstance(holdout, Holdout):
        rows, flat = target_positions(offsets, "train")
        held = np.isin(flat, heldout_positions(starts, lengths, users, holdout))
        keep = held if holdout.adapter else ~held
        return rows[keep], flat[keep]
    first = np.ones_like(lengths)  # position 0 has no history
    last = lengths - 3 - holdout  # inclusive
    if targets_per_user > 0:
        first = np.maximum(first, last - targets_per_user + 1)
    counts = np.maximum(last - first + 1, 0)
    rows = np.repeat(np.arange(len(starts)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, starts[rows] + first[rows] + within


def make_samples(users: np.ndarray, items_column, split: str, max_history: int,
                 targets_per_user: int = 0, holdout: int | Holdout = 0) -> dict[str, np.ndarray]:
    """Vectorised windowing of a batch of user sequences into samples (see module doc)."""
    values, offsets = _flat(items_column)
    rows, tpos = target_positions(offsets, split, targets_per_user, holdout, users)
    user_start = offsets[:-1][rows]
    idx = tpos[:, None] + np.arange(-max_history, 0)[None, :]  # (S, L)
    valid = idx >= user_start[:, None]
    history = np.where(valid, values[np.clip(idx, 0, None)], 0).astype(np.int32)
    out = {
        "user": np.asarray(users, dtype=np.int32)[rows],
        "history": history,
        "history_len": valid.sum(1).astype(np.int32),
        "target": (np.zeros(len(tpos)) if split == "next" else values[tpos]).astype(np.int32),
    }
    if split != "train":
        out["seen"] = np.array([values[s:t] for s, t in zip(user_start, tpos)] + [None], dtype=object)[:-1]
    return out


def make_windows(users: np.ndarray, items_column, max_history: int,
                 holdout: int | Holdout = 0) -> dict[str, np.ndarray]:
    """Training windows with a target at every position (SASRec's original objective).

    The training part of a sequence (all but the last two items, ``m`` items) is cut from the
    end into windows of ``L = max_history`` targets: window ``j`` has targets ``s[e-L:e]`` and
    inputs ``s[e-L-1:e-1]`` with ``e = m - j*L``; both left-padded, target 0 = no loss. Every
    training target position ``1..m-1`` appears exactly once per epoch, as with prefix samples,
    at a fraction of the compute (one forward serves ``L`` targets). A :class:`Holdout` zeroes the
    targets it draws (no loss there; the items stay inputs of later positions).
    """
    values, offsets = _flat(items_column)
    starts, lengths = offsets[:-1], np.diff(offsets)
    drawn = holdout if isinstance(holdout, Holdout) else None
    # an int ``holdout``: the last training targets left out (see target_positions)
    m = lengths - 2 - (0 if drawn else holdout)
    n_win = np.maximum(np.ceil((m - 1) / max_history).astype(np.int64), 0)
    rows = np.repeat(np.arange(len(starts)), n_win)
    j = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    end = starts[rows] + m[rows] - j * max_history  # flat index one past the last target
    cols = np.arange(-max_history, 0)[None, :]
    tgt_idx = end[:, None] + cols
    tgt_ok = tgt_idx >= (starts[rows] + 1)[:, None]
    if drawn is not None:
        tgt_ok_loss = tgt_ok & ~np.isin(tgt_idx, heldout_positions(starts, lengths, users, drawn))
    else:
        tgt_ok_loss = tgt_ok
    target_seq = np.where(tgt_ok_loss, values[np.clip(tgt_idx, 0, None)], 0).astype(np.int32)
    inp_idx = tgt_idx - 1
    history = np.where(tgt_ok, values[np.clip(inp_idx, 0, None)], 0).astype(np.int32)
    return {"user": np.asarray(users, dtype=np.int32)[rows], "history": history,
            "history_len": tgt_ok.sum(1).astype(np.int32), "target_seq": target_seq,
            "target": target_seq[:, -1].copy()}


def window_count(lengths: np.ndarray, max_history: int, holdout: int | Holdout = 0) -> int:
    m = lengths - 2 - (0 if isinstance(holdout, Holdout) else holdout)
    return int(np.maximum(np.ceil((m - 1) / max_history), 0).sum())


def build_samples(batch: pa.Table, split: str, max_history: int, targets_per_user: int = 0,
                  windows: bool = False, max_user: int = 0, holdout: int | Holdout = 0, rank: int = 0,
                  world: int = 1, users: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``Dataset.map_batches(build_samples, batch_format="pyarrow", fn_kwargs=...)`` entry point.

    ``windows=True`` (train split only): :func:`make_windows` instead of prefix samples.
    ``max_user > 0``: only users ``1..max_user`` (smoke runs on a few users). ``world > 1``: only
    the users with ``user % world == rank`` (a training worker's deterministic share).
    ``holdout``: see :func:`target_positions` (train split only). ``users``: only these dense user ids.
    """
    import pyarrow.compute as pc
    if users is not None:
        batch = batch.filter(pc.is_in(batch.column("user"), value_set=pa.array(users, pa.int32())))
    if max_user > 0:
        batch = batch.filter(pc.less_equal(batch.column("user"), max_user))
    if world > 1:
        batch = batch.filter(pa.array(batch.column("user").to_numpy() % world == rank))
    holdout = holdout if split == "train" else 0
    if windows and split == "train":
        return make_windows(batch.column("user").to_numpy(), batch.column("items"), max_history, holdout)
    return make_samples(batch.column("user").to_numpy(), batch.column("items"), split, max_history,
                        targets_per_user, holdout)
