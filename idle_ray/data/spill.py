"""Spill-file rows and the per-file steps the out-of-core engines share (``local`` in one process, ``ray`` in tasks).

A spill file is a flat array of :data:`ROW` records appended in input file order. Every function
here works on one file's rows or on the small global arrays (O(users + items)); an engine decides
where the files live and who runs the steps, so the engines' prepared folders are identical.
"""
from __future__ import annotations

import pickle
import resource
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from idle_ray.data.sequences import has_integer_ties, natural_order, sorted_sequences, write_shards

ROW = np.dtype([("user", "<i4"), ("item", "<i4"), ("ts", "<i8"), ("row", "<i8")])


def peak_rss() -> str:
    """This process's peak RSS so far (Linux reports KiB)."""
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"


def by_partition(part: np.ndarray, n: int):
    """``(p, positions)`` for every partition ``p`` in ``range(n)`` that ``part`` names, positions ascending."""
    order = np.argsort(part, kind="stable")
    ends = np.cumsum(np.bincount(part, minlength=n))
    for p, (lo, hi) in enumerate(zip(np.concatenate(([0], ends[:-1])), ends)):
        if hi > lo:
            yield p, order[lo:hi]


def spill_rows(paths: list[Path], rows: np.ndarray, part: np.ndarray) -> None:
    """Append ``rows`` to ``paths[part]`` (file order kept within each)."""
    for p, at in by_partition(part, len(paths)):
        with open(paths[p], "ab") as f:
            rows[at].tofile(f)


def drop_duplicates(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows without exact duplicates (same user, item and timestamp; the first in file order stays)."""
    dup = pd.DataFrame({"u": rows["user"], "i": rows["item"], "t": rows["ts"]}).duplicated().to_numpy()
    return (rows[~dup], int(dup.sum())) if dup.any() else (rows, 0)


def count_rows(rows: np.ndarray, n_users: int, n_items: int, alive_u=None, alive_i=None):
    """Rows per user code (n_users,) and per item code (n_items,), of the rows whose user and item
    are alive (all rows when no masks are given)."""
    if alive_u is not None:
        rows = rows[alive_u[rows["user"]] & alive_i[rows["item"]]]
    return np.bincount(rows["user"], minlength=n_users), np.bincount(rows["item"], minlength=n_items)


def k_core_counts(count_pass, ucount: np.ndarray, icount: np.ndarray, min_user: int, min_item: int, log):
    """Counts per user and item code of the k-core (zero: filtered). ``count_pass(alive_u, alive_i)``
    returns the counts of the rows whose user and item are alive, over every spill file. A user or
    item filtered in one round has no rows in the next, so the rows left after round k are exactly
    those whose user and item passed round k: a round needs the two masks, not the rows."""
    rounds = 0
    while ((ucount > 0) & (ucount < min_user)).any() or ((icount > 0) & (icount < min_item)).any():
        ucount, icount = count_pass(ucount >= min_user, icount >= min_item)
        rounds += 1
    log(f"[prepare] k-core: {rounds} filtering round(s)")
    return ucount, icount


def first_rows_in(rows: np.ndarray, ucount: np.ndarray, icount: np.ndarray):
    """``((user codes, first rows), (item codes, first rows))`` of the surviving rows of one spill file."""
    rows = rows[(ucount[rows["user"]] > 0) & (icount[rows["item"]] > 0)]  # in file order
    out = []
    for codes in (rows["user"], rows["item"]):
        uniq, at = np.unique(codes, return_index=True)
        out.append((uniq, rows["row"][at]))
    return out


def merge_first_rows(parts, n_users: int, n_items: int):
    """The file row where each surviving user and item first occurs, from :func:`first_rows_in` of every file."""
    first_u = np.full(n_users, np.iinfo(np.int64).max)
    first_i = np.full(n_items, np.iinfo(np.int64).max)
    for (uc, ur), (ic, ir) in parts:
        np.minimum.at(first_u, uc, ur)
        np.minimum.at(first_i, ic, ir)
    return first_u, first_i


def dense_ids(values: np.ndarray, count: np.ndarray, first_row) -> tuple[np.ndarray, np.ndarray]:
    """``(order, dense)``: the surviving original ids in dense order, and code -> dense id (0: filtered).
    ``values``: the original ids by code (first-appearance order); ``first_row()``: each code's first
    file row among the surviving rows (asked only when needed). The order is the in-memory engine's:
    :func:`natural_order` of the ids in order of first appearance among the surviving rows (only equal
    integers written differently depend on it)."""
    codes = np.flatnonzero(count > 0)
    if has_integer_ties(values[codes]):
        codes = codes[np.argsort(first_row()[codes], kind="stable")]
    order = natural_order(values[codes])
    dense = np.zeros(len(count), np.int32)
    dense[codes] = pd.Index(order).get_indexer(values[codes]) + 1
    return order, dense


def shard_ranges(lengths: np.ndarray, rows_per_shard: int, rows_per_range: int) -> np.ndarray:
    """Range index of each shard: consecutive whole shards of about ``rows_per_range`` rows."""
    shard_rows = np.add.reduceat(lengths, np.arange(0, len(lengths), rows_per_shard))
    ranges, acc, r = np.zeros(len(shard_rows), np.int64), 0, 0
    for s, n in enumerate(shard_rows):
        if acc and acc + n > rows_per_range:
            r, acc = r + 1, 0
        ranges[s], acc = r, acc + n
    return ranges


def to_dense(rows: np.ndarray, dense_u: np.ndarray, dense_i: np.ndarray) -> np.ndarray:
    """The rows whose user and item survived, with dense ids (file order kept)."""
    rows = rows[(dense_u[rows["user"]] > 0) & (dense_i[rows["item"]] > 0)]
    rows["user"], rows["item"] = dense_u[rows["user"]], dense_i[rows["item"]]
    return rows


def write_range(seq_dir: Path, rows: np.ndarray, first_shard: int, rows_per_shard: int) -> list[str]:
    """Sort one range's rows and write its shards from ``part-<first_shard>``. Each user's rows come
    from one spill file, appended in file order: a stable sort by (user, timestamp) keeps file order
    for equal timestamps without the row number as a key."""
    users, offsets, item_col, ts_col = sorted_sequences(rows["user"], rows["item"], rows["ts"])
    return write_shards(seq_dir, first_shard, users, offsets, item_col, ts_col, rows_per_shard)


def dense_maps(user_values: np.ndarray, item_values: np.ndarray, ucount: np.ndarray, icount: np.ndarray,
               first_rows_parts):
    """``(user_order, dense_u, item_order, dense_i, lengths)`` of the k-core (:func:`dense_ids` for users
    and items; ``lengths`` (U,): rows per dense user). ``first_rows_parts()``: :func:`first_rows_in` of
    every spill file, asked at most once and only when an order needs it."""
    firsts = []

    def first_rows(which):
        if not firsts:
            firsts.extend(merge_first_rows(first_rows_parts(), len(ucount), len(icount)))
        return firsts[which]
    user_order, dense_u = dense_ids(user_values, ucount, lambda: first_rows(0))
    item_order, dense_i = dense_ids(item_values, icount, lambda: first_rows(1))
    lengths = np.zeros(len(user_order), np.int64)
    lengths[dense_u[ucount > 0] - 1] = ucount[ucount > 0]
    return user_order, dense_u, item_order, dense_i, lengths


def _arrow_ids(ids) -> pa.Array | None:
    """Distinct ids as an Arrow array when Arrow holds them exactly (strings, integers up to 64 bits),
    else None (the Python objects are kept): id files then cost ~1/6 of pickling each id on its own."""
    try:
        arr = pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError):
        return None
    t = arr.type
    return arr if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) else None


def write_ids(path_of, keys: np.ndarray, ids, part: np.ndarray, n: int) -> None:
    """Append ``(keys[at], the ids at at)`` to ``path_of(p)`` for every partition ``p`` of ``part`` (``ids``:
    distinct ids, a pandas Index or an object array). Id files are pickles of the build's own temp
    folder, read back once by :func:`read_ids` (ids may be any value the readers give: integers
    beyond int64 included)."""
    arrow = _arrow_ids(ids)
    listed = ids.tolist() if arrow is None else None
    for p, at in by_partition(part, n):
        payload = arrow.take(pa.array(at)) if arrow is not None else [listed[i] for i in at.tolist()]
        with open(path_of(p), "ab") as f:
            pickle.dump((keys[at], payload), f, protocol=pickle.HIGHEST_PROTOCOL)


def read_ids(path: Path) -> list[tuple[np.ndarray, object]]:
    """Every ``(keys, ids)`` record :func:`write_ids` appended to ``path``, in order; the file is removed."""
    records = []
    if path.exists():
        with open(path, "rb") as f:
            while True:
                try:
                    records.append(pickle.load(f))
                except EOFError:
                    break
        path.unlink()
    return records


def factorize_ids(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """``(code of each id (n,) int64, distinct ids (u,) object)`` over the ids of :func:`read_ids`' records
    in order, codes in order of first appearance."""
    if parts and all(isinstance(x, pa.Array) for x in parts) and len({x.type for x in parts}) == 1:
        encoded = pa.concat_arrays(parts).dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        distinct = encoded.dictionary.to_pylist()
    else:
        flat = np.empty(sum(len(x) for x in parts), dtype=object)
        flat[:] = [v for x in parts for v in (x.to_pylist() if isinstance(x, pa.Array) else x)]
        codes, uniq = pd.factorize(flat)
        distinct = list(uniq)
    out = np.empty(len(distinct), dtype=object)
    out[:] = distinct
    return codes.astype(np.int64), out
