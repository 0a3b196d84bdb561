"""Distributed preparation (``data.engine: ray``): the local engine's passes as Ray tasks, its folder byte for byte.

The per-row work runs in tasks; the driver holds the distinct ids, the count arrays of the k-core
and the dense-id maps (O(users + items)) and the pieces' code maps (an int32 per distinct id of each
piece) (:mod:`idle_ray.data.spill`, shared with
:mod:`idle_ray.data.prepare_local`).

1. scan: one task per piece of the input (:mod:`idle_ray.data.scan_pieces`: ranges of Parquet row
   groups; a CSV or atomic file is one piece), every reader check applied, rows spilled with
   piece-local codes by a stable hash of the user id, the piece's distinct ids to id files by a
   stable hash of the id. One task per partition factorises that partition's ids of every piece
   (:func:`scan_pieces.resolve_ids`); global codes are partition by partition, and the driver
   builds each piece's code map from the tasks' answers (the prepared output does not depend on the
   codes' order: dense ids come from the ids themselves). Bad input: the driver re-reads the input
   as the local engine does, so the error (its
   row, its counts) is the local engine's exactly;
2. one task per partition: the pieces' files concatenated in piece order (each user's rows in file
   order), remapped to global codes, exact duplicates dropped (the first stays), users and items counted;
3. the k-core rounds: per partition tasks count the rows whose user and item are alive (the masks
   put once per round in the object store); the driver iterates as the local engine does;
4. dense ids on the driver (:func:`spill.dense_maps`; first rows from tasks only for equal integers
   written differently);
5. one task per partition re-spills its rows by ranges of dense users (whole shards); one task per
   range sorts them and writes its shards, numbered as the local engine numbers them.

Every result is gathered in piece / partition / range order, so nothing depends on which task ends
first. Tasks are not retried: they append to and delete spill files, so re-running a half-done task
would double or lose rows; a lost worker fails the build (its temp folder is removed) and the next
run rebuilds. Spill files live in the build's temp folder: tasks on other nodes can use it only if it is
on storage every node mounts at the same path (``IDLE_RAY_SHARED_STORAGE=1``, as for the other
folders a cluster's workers read); otherwise every task is pinned to the driver's node (which needs
CPUs). An ``s3://`` / ``gs://`` output is built in a local temp folder and uploaded, so its tasks are
pinned too.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import ray

from idle_ray.data import prepare_local, readers, scan_pieces
from idle_ray.data.readers import DataError
from idle_ray.locations import SHARED_STORAGE_ENV
from idle_ray.data.sequences import Content, check_filtered, check_rating_kept, check_titles
from idle_ray.data.spill import (ROW, count_rows, dense_maps, drop_duplicates, first_rows_in, k_core_counts,
                                 peak_rss, shard_ranges, spill_rows, to_dense, write_range)


def _sparse(count: np.ndarray):
    nz = np.flatnonzero(count)
    return nz, count[nz]


def _add(total: np.ndarray, parts) -> np.ndarray:
    for codes, counts in parts:
        total[codes] += counts
    return total


def _user_file(spill: Path, p: int) -> Path:
    return spill / f"user-{p:04d}.bin"


@ray.remote(max_retries=0)
def _scan(piece, read_args, min_rating, chunk_rows, spill, n_parts):
    return {**scan_pieces.scan_piece(piece, read_args, min_rating, chunk_rows, spill, n_parts),
            "node": ray.get_runtime_context().get_node_id()}


@ray.remote(max_retries=0)
def _resolve_part(kind, q, spill, n_pieces):
    return scan_pieces.resolve_ids(kind, q, spill, n_pieces)


@ray.remote(max_retries=0)
def _dedup(p, spill, n_pieces, user_maps, item_maps, n_users, n_items):
    """Partition ``p``: the pieces' rows in piece order, global codes, duplicates dropped; sparse counts."""
    parts = []
    for k in range(n_pieces):
        path = spill / f"scan-{k:05d}-{p:04d}.bin"
        if path.exists():
            rows = np.fromfile(path, ROW)
            rows["user"], rows["item"] = user_maps[k][rows["user"]], item_maps[k][rows["item"]]
            parts.append(rows)
            path.unlink()
    rows, dropped = drop_duplicates(np.concatenate(parts) if parts else np.empty(0, ROW))
    rows.tofile(_user_file(spill, p))
    uc, ic = count_rows(rows, n_users, n_items)
    return dropped, _sparse(uc), _sparse(ic)


@ray.remote(max_retries=0)
def _count(p, spill, alive_u, alive_i):
    uc, ic = count_rows(np.fromfile(_user_file(spill, p), ROW), len(alive_u), len(alive_i), alive_u, alive_i)
    return _sparse(uc), _sparse(ic)


@ray.remote(max_retries=0)
def _first_rows(p, spill, ucount, icount):
    return first_rows_in(np.fromfile(_user_file(spill, p), ROW), ucount, icount)


@ray.remote(max_retries=0)
def _respill(p, spill, dense_u, dense_i, shard_range, rows_per_shard):
    """Partition ``p``'s surviving rows, dense ids, to ``range-<r>-<p>.bin`` by ranges of dense users."""
    rows = to_dense(np.fromfile(_user_file(spill, p), ROW), dense_u, dense_i)
    ranged = [spill / f"range-{r:04d}-{p:04d}.bin" for r in range(int(shard_range[-1]) + 1)]
    spill_rows(ranged, rows, shard_range[(rows["user"] - 1) // rows_per_shard])
    _user_file(spill, p).unlink()


@ray.remote(max_retries=0)
def _write(r, spill, seq_dir, n_parts, first_shard, rows_per_shard):
    paths = [spill / f"range-{r:04d}-{p:04d}.bin" for p in range(n_parts)]
    rows = np.concatenate([np.fromfile(path, ROW) for path in paths if path.exists()])
    shards = write_range(seq_dir, rows, first_shard, rows_per_shard)
    for path in paths:
        path.unlink(missing_ok=True)
    return shards


def prepare_on_ray(tmp: Path, read_args: dict, items_path: str, files: list[Path], min_rating, min_user: int,
                   min_item: int, rows_per_shard: int, log, chunk_rows: int = 1_000_000, partitions: int = 0,
                   shared_tmp: bool = False) -> Content:
    """Write ``tmp/sequences`` as :func:`prepare_local.prepare_out_of_core` does, with Ray tasks (joins
    the running Ray, or starts one on this machine and stops it after). ``partitions``: spill
    partitions (0: from the input size, at least two per CPU of the cluster); ``shared_tmp``: whether
    ``tmp`` is on storage every node mounts (a local output with ``IDLE_RAY_SHARED_STORAGE=1``, or an
    ``s3://`` / ``gs://`` output built in ``data.build_dir``); if not, the tasks are pinned to this node."""
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    spill = tmp / ".spill"
    spill.mkdir()
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_parts = partitions or min(prepare_local.MAX_PARTITIONS, max(prepare_local.partition_count(files), 2 * cpus))
        opts = {}
        if not shared_tmp:  # the spill folder is on this node only
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            here = ray.get_runtime_context().get_node_id()
            _check_node_has_cpu(here, tmp)
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=False)
        return _prepare(spill, tmp / "sequences", read_args, items_path, files, min_rating, min_user, min_item,
                        rows_per_shard, log, chunk_rows, n_parts, cpus, opts)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def _check_node_has_cpu(node_id: str, tmp: Path) -> None:
    """Tasks pinned to the driver's node never start on a node without CPUs (a cluster's head often
    has none): say so at once instead of waiting forever."""
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    if node.get("Resources", {}).get("CPU", 0) < 1:
        raise DataError("<config>", "data.engine",
                        f"'ray' builds in {tmp.parent}, a folder of this node only, so its tasks must run here, "
                        f"and this node has no CPU (the cluster's other nodes cannot read the folder)",
                        f"set data.build_dir to a folder every node mounts at the same path (an s3:// or gs:// "
                        f"output), or put data.output_dir on such storage and set {SHARED_STORAGE_ENV}=1; or submit "
                        f"the job to a node with CPUs, or use data.engine: local")


def _raise_input_error(pieces, scans, read_args, chunk_rows) -> None:
    """Bad input: raise the local engine's error. A single piece read the input as the local engine
    does; for several, the input is re-read the same way (only on bad input). If that passes (it
    should not), the first piece's error, or the timestamp kinds that differ, are raised."""
    first = next((s["error"] for s in scans if s["error"] is not None), None)
    if len(pieces) > 1:
        for _ in readers.interaction_frames(**read_args, chunk_rows=chunk_rows):
            pass
    if first is not None:
        raise first
    chunks = [c for s in scans for c in s["kinds"]]
    if not chunks:
        raise DataError(read_args["path"], None, "no rows", "give at least one interaction row")
    k0 = chunks[0][1]
    row, k = next(c for c in chunks if c[1] != k0)
    raise DataError(read_args["path"], "timestamp", f"stored as {k0} before row {row}, as {k} from there on: their "
                    "order is ambiguous", "store every timestamp the same way (Unix numbers, or ISO-8601 "
                    "date-times all with a zone or all without)")


def _scan_all(spill, read_args, min_rating, chunk_rows, n_parts, opts, log):
    pieces = scan_pieces.list_pieces(read_args, min(scan_pieces.PIECE_ROWS, chunk_rows))
    log(f"[prepare] ray: {len(pieces)} scan task(s), {n_parts} partitions")
    scans = ray.get([_scan.options(**opts).remote(pc, read_args, min_rating, chunk_rows, spill, n_parts)
                     for pc in pieces])
    log(f"[prepare] ray: scan tasks ran on {len({s['node'] for s in scans})} node(s)")
    kinds = {k for s in scans for _, k in s["kinds"] if k is not None}
    if any(s["error"] is not None for s in scans) or len(kinds) > 1 or sum(s["rows"] for s in scans) == 0:
        _raise_input_error(pieces, scans, read_args, chunk_rows)
    user_values, user_maps = _resolve(spill, "u", [s["users"] for s in scans], n_parts, opts)
    item_values, item_maps = _resolve(spill, "i", [s["items"] for s in scans], n_parts, opts)
    return (user_values, item_values, user_maps, item_maps, len(pieces), sum(s["rows"] for s in scans),
            sum(s["kept"] for s in scans))


def _resolve(spill, kind, piece_sizes, n_parts, opts):
    """``(distinct ids by global code, per piece: local code -> global code)`` from one task per partition."""
    parts = ray.get([_resolve_part.options(**opts).remote(kind, q, spill, len(piece_sizes)) for q in range(n_parts)])
    maps = [np.full(n, -1, np.int32) for n in piece_sizes]
    base = 0
    for distinct, per_piece in parts:
        for k, codes, within in per_piece:
            maps[k][codes] = base + within
        base += len(distinct)
    return np.concatenate([distinct for distinct, _ in parts]), maps


def _prepare(spill, seq_dir, read_args, items_path, files, min_rating, min_user, min_item, rows_per_shard, log,
             chunk_rows, n_parts, cpus, opts) -> Content:
    started = time.perf_counter()
    user_values, item_values, user_maps, item_maps, n_pieces, n_rows, kept = _scan_all(
        spill, read_args, min_rating, chunk_rows, n_parts, opts, log)
    n_users, n_items = len(user_values), len(item_values)
    raw_stats = {"users": n_users, "items": n_items, "interactions": n_rows}
    log(f"[prepare] {read_args['dataset']}: {n_users:,} users, {n_items:,} items, {n_rows:,} interactions before "
        f"filtering ({n_pieces} pieces, {time.perf_counter() - started:.0f} s, driver {peak_rss()})")
    item_table = readers.read_items(read_args["dataset"], read_args["path"], items_path, read_args["columns"],
                                    read_args["delimiter"], read_args["encoding"])
    check_titles(item_table, set(item_values), read_args["dataset"], items_path or str(files[-1]))
    if min_rating is not None:
        log(f"[prepare] kept {kept:,} interactions rated >= {min_rating:g} (dropped {n_rows - kept:,})")
        check_rating_kept(kept, min_rating, files[0])
    um, im = ray.put(user_maps), ray.put(item_maps)  # one copy in the object store, read by every task
    results = ray.get([_dedup.options(**opts).remote(p, spill, n_pieces, um, im, n_users, n_items)
                       for p in range(n_parts)])
    dropped = sum(r[0] for r in results)
    if dropped:
        log(f"[prepare] dropped {dropped:,} exact duplicate rows")
    ucount = _add(np.zeros(n_users, np.int64), [r[1] for r in results])
    icount = _add(np.zeros(n_items, np.int64), [r[2] for r in results])

    def count_pass(alive_u, alive_i):
        au, ai = ray.put(alive_u), ray.put(alive_i)
        parts = ray.get([_count.options(**opts).remote(p, spill, au, ai) for p in range(n_parts)])
        return (_add(np.zeros(n_users, np.int64), [c[0] for c in parts]),
                _add(np.zeros(n_items, np.int64), [c[1] for c in parts]))
    ucount, icount = k_core_counts(count_pass, ucount, icount, min_user, min_item, log)
    check_filtered(ucount[ucount > 0], min_user, min_item, files[0])
    log(f"[prepare] duplicates and k-core done ({time.perf_counter() - started:.0f} s, driver {peak_rss()})")

    def first_rows_parts():
        uc, ic = ray.put(ucount), ray.put(icount)
        return ray.get([_first_rows.options(**opts).remote(p, spill, uc, ic) for p in range(n_parts)])
    user_order, dense_u, item_order, dense_i, lengths = dense_maps(user_values, item_values, ucount, icount,
                                                                   first_rows_parts)
    # about two ranges per CPU (whole shards each), at most the local engine's range size
    per_range = max(1, min(prepare_local.ROWS_PER_RANGE, -(-int(lengths.sum()) // (2 * cpus))))
    shard_range = shard_ranges(lengths, rows_per_shard, per_range)
    refs = [ray.put(a) for a in (dense_u, dense_i, shard_range)]
    ray.get([_respill.options(**opts).remote(p, spill, *refs, rows_per_shard) for p in range(n_parts)])
    seq_dir.mkdir()
    n_ranges = int(shard_range[-1]) + 1
    shards = [s for written in ray.get([
        _write.options(**opts).remote(r, spill, seq_dir, n_parts, int(np.searchsorted(shard_range, r)), rows_per_shard)
        for r in range(n_ranges)]) for s in written]
    log(f"[prepare] wrote {len(shards)} shards in {n_ranges} range task(s) ({time.perf_counter() - started:.0f} s, "
        f"driver {peak_rss()})")
    return Content(user_order, item_order, lengths, raw_stats, n_rows - kept, dropped, shards, item_table)
