"""Out-of-core preparation (``data.engine: local``): the in-memory engine's output in bounded memory.

Passes, over the input once and then over spill files in the build's temp folder:

1. scan the input in chunks (:func:`readers.interaction_frames`, every check of the in-memory
   reader); user and item ids become integer codes (first-appearance order) through a dictionary
   of the distinct ids, built from each chunk's distinct values (``pd.factorize``), never per row;
   rows ``(user code, item code, timestamp, file row)`` go to spill files by user code;
2. per spill file (all rows of a user are in one): exact duplicates (same user, item and
   timestamp; the first in file order stays) are dropped, and users and items counted;
3. the iterated k-core on the count arrays, one pass over the spill files per round;
4. dense ids (:func:`sequences.natural_order` of the surviving ids); rows re-spilled by ranges
   of dense users, each range whole shards;
5. per range: a stable sort by (user, timestamp), file order kept for ties, and its shards written.

Memory: the distinct ids and count arrays (O(users + items)), one input chunk, one spill file.
"""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from idle_ray.data import readers
from idle_ray.data.sequences import (Content, check_filtered, check_rating_kept, check_titles, has_integer_ties,
                                     natural_order, sorted_sequences, write_shards)

ROW = np.dtype([("user", "<i4"), ("item", "<i4"), ("ts", "<i8"), ("row", "<i8")])
ROWS_PER_RANGE = 2_000_000     # rows per sort in the last pass (about 24 bytes each, a few copies)
INPUT_BYTES_PER_PARTITION = 32 << 20
MAX_PARTITIONS = 256
LOG_EVERY_ROWS = 10_000_000


class IdCodes:
    """Distinct ids -> codes 0, 1, ... in order of first appearance."""

    def __init__(self):
        self.index: dict = {}

    def encode(self, ids: pd.Series) -> np.ndarray:
        """(n,) ids -> (n,) int32 codes; a dictionary lookup per distinct id of the chunk, not per row."""
        codes, uniq = pd.factorize(ids)
        index = self.index
        # tolist() boxes the chunk's distinct ids in one call: iterating the Index boxed each one on its own,
        # 3.5x slower (2M users: 0.82 -> 0.28 s per 1M-row chunk), most of the scan's time on large logs
        mapped = np.fromiter((index.setdefault(v, len(index)) for v in uniq.tolist()), np.int64, len(uniq))
        return mapped[codes].astype(np.int32)

    def values(self) -> np.ndarray:
        return np.array(list(self.index), dtype=object)

    def __len__(self) -> int:
        return len(self.index)


def partition_count(files: list[Path]) -> int:
    """Spill files for the input: one per 32 MiB of input (a few million rows), at most 256."""
    size = sum(f.stat().st_size if f.is_file() else 0 for f in files)
    return int(min(MAX_PARTITIONS, 1 + size // INPUT_BYTES_PER_PARTITION))


def _peak() -> str:
    """This process's peak RSS so far (Linux reports KiB)."""
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"


def _spill(paths: list[Path], rows: np.ndarray, part: np.ndarray) -> None:
    """Append ``rows`` to ``paths[part]`` (file order kept within each)."""
    order = np.argsort(part, kind="stable")
    ends = np.cumsum(np.bincount(part, minlength=len(paths)))
    rows = rows[order]
    for p, (lo, hi) in enumerate(zip(np.concatenate(([0], ends[:-1])), ends)):
        if hi > lo:
            with open(paths[p], "ab") as f:
                rows[lo:hi].tofile(f)


def _scan(read_args: dict, min_rating, chunk_rows: int, paths: list[Path], log):
    users, items = IdCodes(), IdCodes()
    n_rows = kept = 0
    for df in readers.interaction_frames(**read_args, chunk_rows=chunk_rows):
        rows = np.empty(len(df), ROW)
        rows["user"] = users.encode(df["user_id"])
        rows["item"] = items.encode(df["item_id"])
        rows["ts"] = df["timestamp"].to_numpy()
        rows["row"] = np.arange(n_rows, n_rows + len(df))
        n_rows += len(df)
        if min_rating is not None:
            rows = rows[df["rating"].to_numpy() >= min_rating]
        kept += len(rows)
        _spill(paths, rows, rows["user"] % len(paths))
        if n_rows // LOG_EVERY_ROWS > (n_rows - len(df)) // LOG_EVERY_ROWS:
            log(f"[prepare] read {n_rows:,} rows ({_peak()})")
    return users, items, n_rows, kept


def _dedup_and_count(paths: list[Path], n_users: int, n_items: int):
    """Drop exact duplicates in each spill file (rewritten in place); counts of what is left."""
    ucount, icount = np.zeros(n_users, np.int64), np.zeros(n_items, np.int64)
    dropped = 0
    for path in paths:
        rows = np.fromfile(path, ROW)
        if not len(rows):
            continue
        dup = pd.DataFrame({"u": rows["user"], "i": rows["item"], "t": rows["ts"]}).duplicated().to_numpy()
        if dup.any():
            dropped += int(dup.sum())
            rows = rows[~dup]
            rows.tofile(path)
        ucount += np.bincount(rows["user"], minlength=n_users)
        icount += np.bincount(rows["item"], minlength=n_items)
    return ucount, icount, dropped


def _k_core(paths: list[Path], ucount: np.ndarray, icount: np.ndarray, min_user: int, min_item: int, log):
    """Counts per user and item code of the k-core (zero: filtered). A user or item filtered in one
    round has no rows in the next, so the rows left after round k are exactly those whose user and
    item passed round k: a round needs the two masks, not the rows."""
    rounds = 0
    while ((ucount > 0) & (ucount < min_user)).any() or ((icount > 0) & (icount < min_item)).any():
        alive_u, alive_i = ucount >= min_user, icount >= min_item
        ucount, icount = np.zeros_like(ucount), np.zeros_like(icount)
        for path in paths:
            rows = np.fromfile(path, ROW)
            keep = alive_u[rows["user"]] & alive_i[rows["item"]]
            ucount += np.bincount(rows["user"][keep], minlength=len(ucount))
            icount += np.bincount(rows["item"][keep], minlength=len(icount))
        rounds += 1
    log(f"[prepare] k-core: {rounds} filtering round(s)")
    return ucount, icount


def _first_rows(paths: list[Path], ucount: np.ndarray, icount: np.ndarray):
    """The file row where each surviving user and item first occurs among the surviving rows."""
    first_u = np.full(len(ucount), np.iinfo(np.int64).max)
    first_i = np.full(len(icount), np.iinfo(np.int64).max)
    for path in paths:
        rows = np.fromfile(path, ROW)
        rows = rows[(ucount[rows["user"]] > 0) & (icount[rows["item"]] > 0)]  # in file order
        for codes, first in ((rows["user"], first_u), (rows["item"], first_i)):
            uniq, at = np.unique(codes, return_index=True)
            np.minimum.at(first, uniq, rows["row"][at])
    return first_u, first_i


def _dense_ids(ids: IdCodes, count: np.ndarray, first_row) -> tuple[np.ndarray, np.ndarray]:
    """``(order, dense)``: the surviving original ids in dense order, and code -> dense id (0: filtered).
    The order is the in-memory engine's: :func:`natural_order` of the ids in order of first
    appearance among the surviving rows (only equal integers written differently depend on it)."""
    codes = np.flatnonzero(count > 0)
    values = ids.values()
    if has_integer_ties(values[codes]):
        codes = codes[np.argsort(first_row()[codes], kind="stable")]
    order = natural_order(values[codes])
    dense = np.zeros(len(count), np.int32)
    dense[codes] = pd.Index(order).get_indexer(values[codes]) + 1
    return order, dense


def _ranges(lengths: np.ndarray, rows_per_shard: int) -> np.ndarray:
    """Range index of each shard: consecutive whole shards of about :data:`ROWS_PER_RANGE` rows."""
    shard_rows = np.add.reduceat(lengths, np.arange(0, len(lengths), rows_per_shard))
    ranges, acc, r = np.zeros(len(shard_rows), np.int64), 0, 0
    for s, n in enumerate(shard_rows):
        if acc and acc + n > ROWS_PER_RANGE:
            r, acc = r + 1, 0
        ranges[s], acc = r, acc + n
    return ranges


def prepare_out_of_core(tmp: Path, read_args: dict, items_path: str, files: list[Path], min_rating,
                        min_user: int, min_item: int, rows_per_shard: int, log, chunk_rows: int = 1_000_000,
                        partitions: int = 0) -> Content:
    """Write ``tmp/sequences`` from the input named by ``read_args`` (:func:`readers.interaction_frames`'
    arguments); ``partitions``: spill files (0: from the input size). Spill files live in ``tmp`` and
    are removed before returning (or with ``tmp`` on an error)."""
    spill = tmp / ".spill"
    spill.mkdir()
    try:
        return _prepare(spill, tmp / "sequences", read_args, items_path, files, min_rating, min_user, min_item,
                        rows_per_shard, log, chunk_rows, partitions or partition_count(files))
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _prepare(spill, seq_dir, read_args, items_path, files, min_rating, min_user, min_item, rows_per_shard, log,
             chunk_rows, n_parts) -> Content:
    started = time.perf_counter()
    hashed = [spill / f"user-{p:04d}.bin" for p in range(n_parts)]
    for p in hashed:
        p.touch()
    users, items, n_rows, kept = _scan(read_args, min_rating, chunk_rows, hashed, log)
    raw_stats = {"users": len(users), "items": len(items), "interactions": n_rows}
    log(f"[prepare] {read_args['dataset']}: {raw_stats['users']:,} users, {raw_stats['items']:,} items, "
        f"{raw_stats['interactions']:,} interactions before filtering ({n_parts} spill files, "
        f"{time.perf_counter() - started:.0f} s, {_peak()})")
    item_table = readers.read_items(read_args["dataset"], read_args["path"], items_path, read_args["columns"],
                                    read_args["delimiter"], read_args["encoding"])
    check_titles(item_table, set(items.index), read_args["dataset"], items_path or str(files[-1]))
    if min_rating is not None:
        log(f"[prepare] kept {kept:,} interactions rated >= {min_rating:g} (dropped {n_rows - kept:,})")
        check_rating_kept(kept, min_rating, files[0])
    ucount, icount, dropped = _dedup_and_count(hashed, len(users), len(items))
    if dropped:
        log(f"[prepare] dropped {dropped:,} exact duplicate rows")
    ucount, icount = _k_core(hashed, ucount, icount, min_user, min_item, log)
    check_filtered(ucount[ucount > 0], min_user, min_item, files[0])
    log(f"[prepare] duplicates and k-core done ({time.perf_counter() - started:.0f} s, {_peak()})")

    firsts = []  # computed once, only if an order needs it

    def first_rows(which):
        if not firsts:
            firsts.extend(_first_rows(hashed, ucount, icount))
        return firsts[which]
    user_order, dense_u = _dense_ids(users, ucount, lambda: first_rows(0))
    item_order, dense_i = _dense_ids(items, icount, lambda: first_rows(1))
    log(f"[prepare] dense ids ({time.perf_counter() - started:.0f} s, {_peak()})")
    lengths = np.zeros(len(user_order), np.int64)
    lengths[dense_u[ucount > 0] - 1] = ucount[ucount > 0]

    shard_range = _ranges(lengths, rows_per_shard)
    ranged = [spill / f"range-{r:04d}.bin" for r in range(int(shard_range[-1]) + 1)]
    for path in hashed:
        rows = np.fromfile(path, ROW)
        rows = rows[(dense_u[rows["user"]] > 0) & (dense_i[rows["item"]] > 0)]
        rows["user"], rows["item"] = dense_u[rows["user"]], dense_i[rows["item"]]
        _spill(ranged, rows, shard_range[(rows["user"] - 1) // rows_per_shard])
        path.unlink()
    seq_dir.mkdir()
    shards = []
    for r, path in enumerate(ranged):
        rows = np.fromfile(path, ROW)
        # A user's rows all come from one spill file, appended in file order: a stable sort by
        # (user, timestamp) keeps file order for equal timestamps without the row number as a key.
        users_r, offsets, item_col, ts_col = sorted_sequences(rows["user"], rows["item"], rows["ts"])
        shards += write_shards(seq_dir, int(np.searchsorted(shard_range, r)), users_r, offsets, item_col, ts_col,
                               rows_per_shard)
        path.unlink()
    log(f"[prepare] wrote {len(shards)} shards ({time.perf_counter() - started:.0f} s, {_peak()})")
    return Content(user_order, item_order, lengths, raw_stats, n_rows - kept, dropped, shards, item_table)
