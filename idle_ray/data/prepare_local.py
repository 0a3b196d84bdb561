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

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from idle_ray.data import readers
from idle_ray.data.sequences import Content, check_filtered, check_rating_kept, check_titles
from idle_ray.data.spill import (ROW, count_rows, dense_maps, drop_duplicates, first_rows_in, k_core_counts,
                                 peak_rss, shard_ranges, spill_rows, to_dense, write_range)

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
        spill_rows(paths, rows, rows["user"] % len(paths))
        if n_rows // LOG_EVERY_ROWS > (n_rows - len(df)) // LOG_EVERY_ROWS:
            log(f"[prepare] read {n_rows:,} rows ({peak_rss()})")
    return users, items, n_rows, kept


def _dedup_and_count(paths: list[Path], n_users: int, n_items: int):
    """Drop exact duplicates in each spill file (rewritten in place); counts of what is left."""
    ucount, icount = np.zeros(n_users, np.int64), np.zeros(n_items, np.int64)
    dropped = 0
    for path in paths:
        rows = np.fromfile(path, ROW)
        if not len(rows):
            continue
        rows, d = drop_duplicates(rows)
        if d:
            dropped += d
            rows.tofile(path)
        uc, ic = count_rows(rows, n_users, n_items)
        ucount += uc
        icount += ic
    return ucount, icount, dropped


def _count_pass(paths: list[Path]):
    """One k-core round over the spill files: counts of the rows whose user and item are alive."""
    def count(alive_u, alive_i):
        ucount, icount = np.zeros(len(alive_u), np.int64), np.zeros(len(alive_i), np.int64)
        for path in paths:
            uc, ic = count_rows(np.fromfile(path, ROW), len(alive_u), len(alive_i), alive_u, alive_i)
            ucount += uc
            icount += ic
        return ucount, icount
    return count


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
        f"{time.perf_counter() - started:.0f} s, {peak_rss()})")
    item_table = readers.read_items(read_args["dataset"], read_args["path"], items_path, read_args["columns"],
                                    read_args["delimiter"], read_args["encoding"])
    check_titles(item_table, set(items.index), read_args["dataset"], items_path or str(files[-1]))
    if min_rating is not None:
        log(f"[prepare] kept {kept:,} interactions rated >= {min_rating:g} (dropped {n_rows - kept:,})")
        check_rating_kept(kept, min_rating, files[0])
    ucount, icount, dropped = _dedup_and_count(hashed, len(users), len(items))
    if dropped:
        log(f"[prepare] dropped {dropped:,} exact duplicate rows")
    ucount, icount = k_core_counts(_count_pass(hashed), ucount, icount, min_user, min_item, log)
    check_filtered(ucount[ucount > 0], min_user, min_item, files[0])
    log(f"[prepare] duplicates and k-core done ({time.perf_counter() - started:.0f} s, {peak_rss()})")
    user_order, dense_u, item_order, dense_i, lengths = dense_maps(
        users.values(), items.values(), ucount, icount,
        lambda: [first_rows_in(np.fromfile(path, ROW), ucount, icount) for path in hashed])
    log(f"[prepare] dense ids ({time.perf_counter() - started:.0f} s, {peak_rss()})")

    shard_range = shard_ranges(lengths, rows_per_shard, ROWS_PER_RANGE)
    ranged = [spill / f"range-{r:04d}.bin" for r in range(int(shard_range[-1]) + 1)]
    for path in hashed:
        rows = to_dense(np.fromfile(path, ROW), dense_u, dense_i)
        spill_rows(ranged, rows, shard_range[(rows["user"] - 1) // rows_per_shard])
        path.unlink()
    seq_dir.mkdir()
    shards = []
    for r, path in enumerate(ranged):
        shards += write_range(seq_dir, np.fromfile(path, ROW), int(np.searchsorted(shard_range, r)), rows_per_shard)
        path.unlink()
    log(f"[prepare] wrote {len(shards)} shards ({time.perf_counter() - started:.0f} s, {peak_rss()})")
    return Content(user_order, item_order, lengths, raw_stats, n_rows - kept, dropped, shards, item_table)
