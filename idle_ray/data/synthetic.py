"""Seeded synthetic interaction logs for scale tests: power-law users and items, ties, Parquet in chunks.

The log is defined by its arguments alone (not by how it is written): it is generated in blocks of
:data:`BLOCK_ROWS` rows, block ``b`` from the random stream ``(seed, 0, b)``, and each block is one
Parquet row group, so ``interactions=10**8`` holds one block in memory, never the log.

* users: activity weights drawn from a Pareto distribution (shape ``user_alpha``; the tail of
  interactions per user is a power law, the heaviest users have thousands of times the median);
* items: Zipf popularity, weight of the item of popularity rank r ∝ r^-``item_alpha``, ranks
  shuffled over the item ids (popular items are not the small ids);
* timestamps: integer seconds spread over a year in log order, plus up to an hour of jitter (the
  file is roughly, not exactly, in time order); a ``tie_rate`` share of the rows repeat the
  previous row's user and second with another item (bursts: equal timestamps within a user, where
  file order decides), and a ``duplicate_rate`` share repeat the previous row exactly;
* ids: strings ``u<n>`` / ``i<n>`` (``string_ids``) or the integers ``n``.

Columns ``user_id``, ``item_id``, ``timestamp`` (int64); optionally an item table ``item_id``,
``title`` listing exactly the items that occur (what ``data.items_path`` expects).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BLOCK_ROWS = 1_000_000
START = 1_600_000_000        # 2020-09-13, Unix seconds
SPAN = 365 * 86_400          # the log covers a year
JITTER = 3_600


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _ids(values: np.ndarray, prefix: str, string_ids: bool) -> pa.Array:
    arr = pa.array(values, pa.int64())
    return pc.binary_join_element_wise(prefix, pc.cast(arr, pa.string()), "") if string_ids else arr


def synthetic_block(b: int, interactions: int, seed: int, user_cdf: np.ndarray, item_of_rank: np.ndarray,
                    item_cdf: np.ndarray, tie_rate: float, duplicate_rate: float):
    """Block ``b`` as ``(user (n,) int64, item (n,) int64, timestamp (n,) int64)``."""
    lo, hi = b * BLOCK_ROWS, min(interactions, (b + 1) * BLOCK_ROWS)
    rng = np.random.default_rng([seed, 0, b])
    n = hi - lo
    user = _draw(user_cdf, rng.random(n))
    item = item_of_rank[_draw(item_cdf, rng.random(n))]
    ts = START + (np.arange(lo, hi) * SPAN) // max(1, interactions) + rng.integers(0, JITTER, n)
    burst = np.flatnonzero(rng.random(n) < tie_rate)
    burst = burst[burst > 0]
    user[burst], ts[burst] = user[burst - 1], ts[burst - 1]
    dup = np.flatnonzero(rng.random(n) < duplicate_rate)
    dup = dup[dup > 0]
    user[dup], item[dup], ts[dup] = user[dup - 1], item[dup - 1], ts[dup - 1]
    return user, item, ts


def write_synthetic_log(path: str | Path, interactions: int, *, users: int = 0, items: int = 0, seed: int = 0,
                        user_alpha: float = 2.0, item_alpha: float = 1.0, tie_rate: float = 0.05,
                        duplicate_rate: float = 0.001, string_ids: bool = True, titles_path: str | Path = "",
                        log=print) -> dict:
    """Write the log to ``path`` (Parquet; temp file + rename) and, with ``titles_path``, its item
    table. ``users`` / ``items``: 0 = interactions // 50 / interactions // 500 (at least 10).
    Returns the sizes written."""
    users = users or max(10, interactions // 50)
    items = items or max(10, interactions // 500)
    user_cdf = _cdf(np.random.default_rng([seed, 1]).pareto(user_alpha, users) + 1.0)
    item_cdf = _cdf(np.arange(1, items + 1, dtype=np.float64) ** -item_alpha)
    item_of_rank = np.random.default_rng([seed, 2]).permutation(items)
    seen = np.zeros(items, bool)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    schema = pa.schema([("user_id", pa.string() if string_ids else pa.int64()),
                        ("item_id", pa.string() if string_ids else pa.int64()), ("timestamp", pa.int64())])
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for b in range(-(-interactions // BLOCK_ROWS)):
                user, item, ts = synthetic_block(b, interactions, seed, user_cdf, item_of_rank, item_cdf,
                                                 tie_rate, duplicate_rate)
                seen[item] = True
                writer.write_table(pa.Table.from_arrays(
                    [_ids(user, "u", string_ids), _ids(item, "i", string_ids), pa.array(ts, pa.int64())],
                    schema=schema))
                log(f"[synth] {min(interactions, (b + 1) * BLOCK_ROWS):,} / {interactions:,} rows")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    out = {"path": str(path), "interactions": interactions, "users": users, "items": items,
           "items_occurring": int(seen.sum()), "bytes": path.stat().st_size}
    if titles_path:
        occurring = np.flatnonzero(seen)
        table = pa.table({"item_id": _ids(occurring, "i", string_ids),
                          "title": pa.array([f"Synthetic item {i}" for i in occurring], pa.string())})
        titles_path = Path(titles_path)
        tmp = titles_path.with_name(f".{titles_path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, titles_path)
        out["titles"] = str(titles_path)
    return out
