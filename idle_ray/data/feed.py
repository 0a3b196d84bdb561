"""The training feed's consumer side: blocks of user sequences windowed into sample batches in the worker.

Ray Data moves each user's sequence once per pass (one list row, ``user, items``) instead of the
user's samples (a ``max_history`` window each, ~50x the data); the training worker windows a block
with :func:`~idle_ray.data.samples.build_samples` (vectorised numpy, no per-row Python) where the
batches are consumed. ``benchmarks/data_pipeline.py`` measures this feed against the single-process
reader (README, "Data pipeline benchmark").
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import numpy as np

from idle_ray.data.samples import Holdout, build_samples


@dataclass(frozen=True)
class Windowing:
    """What a worker makes of a block of sequences: :func:`~idle_ray.data.samples.build_samples`'
    arguments. ``rank``/``world``: only the users with ``user % world == rank`` (a worker's share).
    ``shuffle_samples``: the seeded shuffle's buffer (``data.shuffle_samples``, :func:`seeded_batches`)."""
    split: str
    max_history: int
    targets_per_user: int = 0
    windows: bool = False
    holdout: int | Holdout = 0
    rank: int = 0
    world: int = 1
    shuffle_samples: int = 1 << 20

    def for_rank(self, rank: int, world: int) -> Windowing:
        return replace(self, rank=rank, world=world)

    def samples(self, table) -> dict[str, np.ndarray]:
        """Samples of a block (an Arrow table with ``user``, ``items``), users in the block's order."""
        return build_samples(table, self.split, self.max_history, self.targets_per_user, self.windows,
                             holdout=self.holdout, rank=self.rank, world=self.world)


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def shuffled_batches(columns: dict[str, np.ndarray], batch_size: int, seed) -> Iterator[dict]:
    """Batches of a set of samples in a seeded order: the samples in canonical order (by user, then
    position: however the blocks arrived), then ``default_rng(seed).permutation`` (``seed``: an int or a
    ``numpy.random.Generator``, which is used as it is)."""
    n = len(columns["target"])
    order = np.argsort(columns["user"], kind="stable")[np.random.default_rng(seed).permutation(n)]
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        yield {k: v[idx] for k, v in columns.items()}


def seeded_batches(parts: Iterable[dict], batch_size: int, seed: int, buffer: int) -> Iterator[dict]:
    """Batches of a stream of sample parts, shuffled with a seed in memory-bounded runs.

    The stream is cut into runs of exactly ``buffer`` samples (rounded down to whole batches, at least
    one batch), each shuffled by :func:`shuffled_batches` with one generator ``default_rng(seed)``
    drawn in turn: when the whole share fits (ML-1M: ~0.5M samples per worker of two, under the
    default 1M) that is a global shuffle independent of how the stream was split into parts; beyond
    it, memory stays at one run (~``buffer x (2 max_history + 3) x 4`` bytes for windows) and the
    order depends on the stream's order, which the training feed keeps (``preserve_order``, shards
    read in order). Every batch but the last overall is full.
    """
    cut = max(1, buffer // batch_size) * batch_size
    rng = np.random.default_rng(seed)
    pending, held = [], 0
    for part in parts:
        pending.append(part)
        held += len(part["target"])
        while held >= cut:
            whole = _concat(pending) if len(pending) > 1 else pending[0]
            yield from shuffled_batches({k: v[:cut] for k, v in whole.items()}, batch_size, rng)
            pending, held = [{k: v[cut:] for k, v in whole.items()}], held - cut
    if held:
        yield from shuffled_batches(_concat(pending) if len(pending) > 1 else pending[0], batch_size, rng)


def _parts(blocks: Iterable, windowing: Windowing, users: int) -> Iterator[dict]:
    """Samples of ``users`` sequences at a time (a block holds up to Ray's target block size of
    sequences, ~50x that as samples)."""
    for table in blocks:
        for lo in range(0, table.num_rows, users):
            yield windowing.samples(table.slice(lo, users))


def sample_batches(blocks: Iterable, windowing: Windowing, batch_size: int,
                   seed: int | None = None, users: int = 1024) -> Iterator[dict]:
    """Batches of ``batch_size`` samples (the last one shorter) from blocks of sequences.

    ``seed=None``: streamed, in the order the blocks arrive (``users`` sequences' samples in memory).
    A ``seed``: :func:`seeded_batches` over ``windowing.shuffle_samples`` samples at a time (the whole
    share of ML-1M, ~100 MB per worker of two).
    """
    if seed is not None:
        yield from seeded_batches(_parts(blocks, windowing, users), batch_size, seed, windowing.shuffle_samples)
        return
    carry = None  # the last samples of the previous part, fewer than a batch
    for part in _parts(blocks, windowing, users):
        n, lo = len(part["target"]), 0
        if carry is not None:  # complete it from this part's head (copies a batch, not the part)
            lo = min(n, batch_size - len(carry["target"]))
            carry = _concat([carry, {k: v[:lo] for k, v in part.items()}])
            if len(carry["target"]) < batch_size:
                continue
            yield carry
        full = lo + (n - lo) // batch_size * batch_size
        for start in range(lo, full, batch_size):
            yield {k: v[start:start + batch_size] for k, v in part.items()}
        carry = {k: v[full:] for k, v in part.items()}
    if carry is not None and len(carry["target"]):
        yield carry
