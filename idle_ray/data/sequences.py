"""What every preparation engine produces the same way: the checks between the steps, dense-id order, shards.

An engine (in memory: :mod:`idle_ray.data.prepare`; out of core: :mod:`idle_ray.data.prepare_local`)
reads, filters and orders the interactions; the rules it must agree on live here, so that the
engines' prepared folders are identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from idle_ray.data.readers import DataError

SEQUENCE_SCHEMA = pa.schema([
    pa.field("user", pa.int32(), nullable=False),
    pa.field("items", pa.list_(pa.int32()), nullable=False),
    pa.field("timestamps", pa.list_(pa.int64()), nullable=False),
])
MIN_SEQUENCE = 3  # leave-one-out needs a train item, a valid target and a test target


@dataclass
class Content:
    """What an engine hands to the vocabulary and manifest writer.

    ``user_order`` / ``item_order``: original ids in dense-id order (dense id = index + 1);
    ``lengths``: interactions per dense user (U,); ``shards``: the written shard paths, relative;
    ``items``: the item table (``item_id``, ``title``) or None."""
    user_order: np.ndarray
    item_order: np.ndarray
    lengths: np.ndarray
    raw_stats: dict
    rating_dropped: int
    duplicates_dropped: int
    shards: list[str]
    items: pd.DataFrame | None


def natural_order(ids: np.ndarray) -> np.ndarray:
    """Unique ids sorted numerically when they all are integers, else lexicographically. Equal
    integers written differently ("7", "07") keep their order in ``ids``."""
    uniq = pd.unique(ids)
    try:
        return uniq[np.argsort(uniq.astype(np.int64), kind="stable")]
    except OverflowError:  # integers beyond int64 (e.g. 64-bit unsigned hashes): Python ints sort them
        try:
            return np.array(sorted(uniq, key=int), dtype=uniq.dtype)
        except ValueError:
            return np.sort(uniq)
    except ValueError:
        return np.sort(uniq)


def has_integer_ties(ids: np.ndarray) -> bool:
    """Whether :func:`natural_order` sorts ``ids`` (distinct) as integers with some equal ones, i.e.
    whether their order in the input decides."""
    try:
        return len(set(map(int, ids))) < len(ids)
    except ValueError:
        return False


def check_titles(items: pd.DataFrame | None, interacted: set, dataset: str, source: str) -> None:
    """Every interacted item has a title; a user's title table names no item that never occurs."""
    if items is None:
        return
    known = set(items["item_id"])
    missing = interacted - known
    if missing:
        raise DataError(source, "item_id", f"{len(missing)} interacted item(s) have no title, e.g. {sorted(missing)[:3]}",
                        "add a title row for every item in the interactions (same id format)")
    extra = known - interacted
    if extra and dataset not in ("ml-100k", "ml-1m"):
        raise DataError(source, "item_id", f"{len(extra)} item(s) in the title table never occur in the "
                        f"interactions, e.g. {sorted(extra)[:3]} (an id format mismatch?)",
                        "make item ids in both files match, or remove the unknown rows")


def check_rating_kept(kept: int, min_rating: float, file: Path) -> None:
    if kept == 0:
        raise DataError(file, "rating", f"no interaction is rated >= {min_rating:g}",
                        "lower data.min_rating, or set it to null")


def check_filtered(lengths: np.ndarray, min_user: int, min_item: int, file: Path) -> None:
    """``lengths``: interactions per user left by the k-core filter."""
    if int(lengths.sum()) == 0:
        raise DataError(file, "user_id", f"no user keeps >= {min_user} interactions after "
                        f"{min_user}/{min_item}-core filtering",
                        "lower data.min_user_interactions / data.min_item_interactions, or give more data")
    if (lengths < MIN_SEQUENCE).any():  # only reachable when min_user < 3 is forced past config checks
        raise DataError(file, "user_id", f"{int((lengths < MIN_SEQUENCE).sum())} users have < {MIN_SEQUENCE} "
                        "interactions after filtering", "set data.min_user_interactions >= 3")


def write_shards(folder: Path, first_shard: int, users: np.ndarray, offsets: np.ndarray, item_col: np.ndarray,
                 ts_col: np.ndarray, rows_per_shard: int) -> list[str]:
    """Write consecutive dense users as shards ``part-<first_shard>...`` of ``rows_per_shard`` users.

    ``users`` (n,) dense ids in order; ``offsets`` (n+1,) where each user's rows start in
    ``item_col`` / ``ts_col`` (rows sorted by user, then time, then file order). Returns the shard
    paths relative to the dataset folder."""
    names = []
    for s, lo in enumerate(range(0, len(users), rows_per_shard), start=first_shard):
        hi = min(lo + rows_per_shard, len(users))
        o = offsets[lo:hi + 1]
        rel = o - o[0]
        items_arr = pa.ListArray.from_arrays(pa.array(rel, pa.int32()), pa.array(item_col[o[0]:o[-1]], pa.int32()))
        ts_arr = pa.ListArray.from_arrays(pa.array(rel, pa.int32()), pa.array(ts_col[o[0]:o[-1]], pa.int64()))
        table = pa.Table.from_arrays([pa.array(users[lo:hi], pa.int32()), items_arr, ts_arr], schema=SEQUENCE_SCHEMA)
        name = f"part-{s:05d}.parquet"
        pq.write_table(table, folder / name)
        names.append(f"sequences/{name}")
    return names


def sorted_sequences(user: np.ndarray, item: np.ndarray, ts: np.ndarray):
    """Rows (each user's in file order) -> ``(users, offsets, item_col, ts_col)`` for
    :func:`write_shards`: a stable sort by dense user, then timestamp (file order breaks ties)."""
    order = np.lexsort((ts, user))
    user, item, ts = user[order], item[order], ts[order]
    users, starts = np.unique(user, return_index=True)
    return users, np.append(starts, len(user)).astype(np.int64), item, ts
