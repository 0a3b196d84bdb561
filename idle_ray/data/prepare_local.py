"""Out-of-core preparation (``data.engine: local``): the in-memory engine's output in bounded memory.

Passes, over the input once and then over spill files in the build's temp folder:

1. scan the input in chunks (:func:`readers.interaction_frames`, every check of the in-memory
   reader). Item ids become integer codes through a dictionary of the distinct ids, fed each chunk's
   distinct values (``pd.factorize``), never per row. User ids (many more) get no global dictionary
   during the scan: each chunk's distinct users are written to the id file of their partition (a hash
   of the id) and the rows carry codes local to their chunk; rows ``(user, item code, timestamp, file
   row)`` go to spill files by the same hash of the user id;
2. per spill file (all rows of a user are in one, and all of its users' ids in one id file): the
   partition's ids are factorised in one call (global user codes, partition by partition), the rows
   take them, exact duplicates (same user, item and timestamp; the first in file order stays) are
   dropped, and users and items counted;
3. the iterated k-core on the count arrays, one pass over the spill files per round;
4. dense ids (:func:`sequences.natural_order` of the surviving ids); rows re-spilled by ranges
   of dense users, each range whole shards;
5. per range: a stable sort by (user, timestamp), file order kept for ties, and its shards written.

Memory: the distinct ids and count arrays (O(users + items)), one input chunk, one spill file and
its id file.

Why users are deferred: a chunk's distinct users grow with the log (a 1M-row chunk of a 100M-row log
with 2M users holds ~700K of them, of a 10M-row log ~190K), and looking each up in a dictionary of
all users costs more per lookup as it grows (cache misses): the scan's time per row grew 2.9x from
10M to 100M rows. Writing a chunk's distinct users to their id file costs the same per id whatever
the log's size, and factorising an id file works on one partition's users.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from idle_ray.data import readers
from idle_ray.data.sequences import Content, check_filtered, check_rating_kept, check_titles
from idle_ray.data.spill import (ROW, count_rows, dense_maps, drop_duplicates, factorize_ids, first_rows_in,
                                 k_core_counts, peak_rss, read_ids, shard_ranges, spill_rows, to_dense, write_ids,
                                 write_range)

ROWS_PER_RANGE = 2_000_000     # rows per sort in the last pass (about 24 bytes each, a few copies)
INPUT_BYTES_PER_PARTITION = 32 << 20
MAX_PARTITIONS = 256
LOG_EVERY_ROWS = 10_000_000


class IdCodes:
    """Distinct ids -> codes 0, 1, ... in order of first appearance."""

    def __init__(self):
        self.index: dict = {}

    def encode(self, ids: pd.Series, new: list | None = None) -> np.ndarray:
        """(n,) ids -> (n,) int32 codes; a dictionary lookup per distinct id of the chunk, not per row.
        ``new``: a list the ids seen for the first time are appended to, in code order."""
        codes, uniq = pd.factorize(ids)
        index = self.index
        before = len(index)
        # tolist() boxes the chunk's distinct ids in one call: iterating the Index boxed each one on its own,
        # 3.5x slower (2M users: 0.82 -> 0.28 s per 1M-row chunk)
        values = uniq.tolist()
        mapped = np.fromiter((index.setdefault(v, len(index)) for v in values), np.int64, len(values))
        if new is not None:
            new += [values[i] for i in np.flatnonzero(mapped >= before).tolist()]
        return mapped[codes].astype(np.int32)

    def values(self) -> np.ndarray:
        return np.array(list(self.index), dtype=object)

    def __len__(self) -> int:
        return len(self.index)


def hash_partitions(values: list, n: int) -> np.ndarray:
    """(len(values),) partition in ``range(n)`` of each id, from Python's hash of the value (the same id
    gets the same partition within a process; the prepared output does not depend on it), mixed so
    that patterned integer ids (e.g. all even) still spread."""
    h = np.fromiter(map(hash, values), np.int64, len(values)).view(np.uint64)
    return ((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)) % np.uint64(n)


class DeferredIds:
    """User ids without a global dictionary during the scan (see the module docstring).

    :meth:`encode` gives each row its code local to its chunk and writes the chunk's distinct ids to
    ``ids-<partition>.pkl`` as ``(keys, ids)`` records (:func:`spill.write_ids`), a key being ``first
    row of the chunk + local code`` (unique, and ascending in each file). :meth:`resolve` reads one
    partition's file and returns its keys, the code of each key within the partition and the
    partition's distinct ids."""

    def __init__(self, folder: Path, n_parts: int):
        self.paths = [folder / f"ids-{p:04d}.pkl" for p in range(n_parts)]

    def encode(self, ids: pd.Series, first_row: int) -> tuple[np.ndarray, np.ndarray]:
        """``(local codes (n,) int32, partition of each row (n,))`` of a chunk starting at ``first_row``."""
        codes, uniq = pd.factorize(ids)
        part = hash_partitions(uniq.tolist(), len(self.paths))
        write_ids(self.paths.__getitem__, first_row + np.arange(len(uniq)), uniq, part, len(self.paths))
        return codes.astype(np.int32), part[codes].astype(np.int64)

    def resolve(self, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keys (k,) ascending, code within the partition (k,), distinct ids (u,) object)`` of partition ``p``."""
        records = read_ids(self.paths[p])
        if not records:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([], dtype=object)
        codes, distinct = factorize_ids([ids for _, ids in records])
        return np.concatenate([keys for keys, _ in records]), codes, distinct


def partition_count(files: list[Path]) -> int:
    """Spill files for the input: one per 32 MiB of input (a few million rows), at most 256."""
    size = sum(f.stat().st_size if f.is_file() else 0 for f in files)
    return int(min(MAX_PARTITIONS, 1 + size // INPUT_BYTES_PER_PARTITION))


def _scan(read_args: dict, min_rating, chunk_rows: int, paths: list[Path], users: DeferredIds, log):
    items = IdCodes()
    n_rows = kept = 0
    starts = []
    for df in readers.interaction_frames(**read_args, chunk_rows=chunk_rows):
        starts.append(n_rows)
        rows = np.empty(len(df), ROW)
        rows["user"], part = users.encode(df["user_id"], n_rows)
        rows["item"] = items.encode(df["item_id"])
        rows["ts"] = df["timestamp"].to_numpy()
        rows["row"] = np.arange(n_rows, n_rows + len(df))
        n_rows += len(df)
        if min_rating is not None:
            keep = df["rating"].to_numpy() >= min_rating
            rows, part = rows[keep], part[keep]
        kept += len(rows)
        spill_rows(paths, rows, part)
        if n_rows // LOG_EVERY_ROWS > (n_rows - len(df)) // LOG_EVERY_ROWS:
            log(f"[prepare] read {n_rows:,} rows ({peak_rss()})")
    return items, np.array(starts, np.int64), n_rows, kept


def _resolve_dedup_and_count(paths: list[Path], users: DeferredIds, starts: np.ndarray, n_items: int):
    """Per spill file: its users' global codes (partition by partition), exact duplicates dropped (the
    file rewritten in place); the distinct user ids by code (every user of the input, filtered rows'
    included) and the counts of what is left."""
    user_values, ucounts, icount = [], [], np.zeros(n_items, np.int64)
    base = dropped = 0
    for p, path in enumerate(paths):
        keys, codes, uniq = users.resolve(p)
        rows = np.fromfile(path, ROW)
        if len(rows):
            chunk_first = starts[np.searchsorted(starts, rows["row"], side="right") - 1]
            rows["user"] = codes[np.searchsorted(keys, chunk_first + rows["user"])]  # within the partition
            rows, d = drop_duplicates(rows)
            dropped += d
        uc, ic = count_rows(rows, len(uniq), n_items)
        rows["user"] += base
        rows.tofile(path)
        ucounts.append(uc)
        icount += ic
        user_values.append(uniq)
        base += len(uniq)
    return np.concatenate(user_values), np.concatenate(ucounts), icount, dropped


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
    users = DeferredIds(spill, n_parts)
    items, starts, n_rows, kept = _scan(read_args, min_rating, chunk_rows, hashed, users, log)
    log(f"[prepare] read {n_rows:,} interactions, {len(items):,} items ({n_parts} spill files, "
        f"{time.perf_counter() - started:.0f} s, {peak_rss()})")
    item_table = readers.read_items(read_args["dataset"], read_args["path"], items_path, read_args["columns"],
                                    read_args["delimiter"], read_args["encoding"])
    check_titles(item_table, set(items.index), read_args["dataset"], items_path or str(files[-1]))
    if min_rating is not None:
        log(f"[prepare] kept {kept:,} interactions rated >= {min_rating:g} (dropped {n_rows - kept:,})")
        check_rating_kept(kept, min_rating, files[0])
    user_values, ucount, icount, dropped = _resolve_dedup_and_count(hashed, users, starts, len(items))
    raw_stats = {"users": len(user_values), "items": len(items), "interactions": n_rows}
    log(f"[prepare] {read_args['dataset']}: {raw_stats['users']:,} users, {raw_stats['items']:,} items, "
        f"{raw_stats['interactions']:,} interactions before filtering ({time.perf_counter() - started:.0f} s, "
        f"{peak_rss()})")
    if dropped:
        log(f"[prepare] dropped {dropped:,} exact duplicate rows")
    ucount, icount = k_core_counts(_count_pass(hashed), ucount, icount, min_user, min_item, log)
    check_filtered(ucount[ucount > 0], min_user, min_item, files[0])
    log(f"[prepare] duplicates and k-core done ({time.perf_counter() - started:.0f} s, {peak_rss()})")
    user_order, dense_u, item_order, dense_i, lengths = dense_maps(
        user_values, items.values(), ucount, icount,
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
