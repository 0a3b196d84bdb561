"""The input split into pieces that tasks scan independently, and the scan of one piece into spill files.

A Parquet input (a file or a folder of files) splits into ranges of at most ``piece_rows`` rows
within its row groups; any other input (CSV, atomic files, the packaged ml-*) is one piece read by
:func:`readers.interaction_frames`. A piece knows the file row of its first row, so its rows carry
the row numbers the local engine gives them. Ids become codes local to the piece (first-appearance
order). A piece's distinct ids are written to id files by a stable hash of the id
(``uid-<piece>-<partition>.pkl``, ``iid-...``), so that one task per partition can give them global
codes (:func:`resolve_ids`) without the driver ever holding every piece's ids (at 100M rows in 400
pieces they were ~80M Python strings).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from idle_ray.data import readers
from idle_ray.data.normalise import normalise_table_chunk
from idle_ray.data.prepare_local import IdCodes
from idle_ray.data.readers import DataError
from idle_ray.data.spill import ROW, factorize_ids, read_ids, spill_rows, write_ids
from idle_ray.data.tables import is_parquet

PIECE_ROWS = 250_000


@dataclass(frozen=True)
class Piece:
    """Rows ``lo:hi`` of one Parquet row group (``fragment``, read with the dataset's ``schema`` so hive
    partition columns are filled), or the whole input (``fragment`` None). ``first_row``: the file row
    of the piece's first row."""
    index: int
    first_row: int
    fragment: object = None
    schema: object = None
    lo: int = 0
    hi: int = 0


def list_pieces(read_args: dict, piece_rows: int) -> list[Piece]:
    """The pieces of the input, in file order (the order the local engine reads it in)."""
    path = Path(read_args["path"]) if read_args["path"] else None
    if read_args["dataset"] == "parquet" and path is not None and path.exists() and is_parquet(path):
        try:
            dataset = ds.dataset(path, format="parquet", partitioning="hive")
            pieces, start = [], 0
            for fragment in dataset.get_fragments():
                for group in fragment.split_by_row_group():
                    n = group.row_groups[0].num_rows
                    for lo in range(0, n, piece_rows):
                        pieces.append(Piece(len(pieces), start + lo, group, dataset.schema, lo, min(n, lo + piece_rows)))
                    start += n
            if pieces:
                return pieces
        except (pa.ArrowInvalid, OSError):
            pass  # the whole-input scan reports it, as the local engine does
    return [Piece(0, 0)]


def _frames(piece: Piece, read_args: dict, chunk_rows: int):
    """``(frame, how timestamps were stored)`` of the piece, in file order, every reader check applied;
    the kind is None for the whole input (:func:`readers.interaction_frames` compares kinds itself)."""
    if piece.fragment is None:
        for df in readers.interaction_frames(**read_args, chunk_rows=chunk_rows):
            yield df, None
        return
    file = Path(read_args["path"])
    at, pending = 0, []
    try:
        for batch in piece.fragment.to_batches(schema=piece.schema, batch_size=chunk_rows):
            lo, hi = max(piece.lo, at), min(piece.hi, at + batch.num_rows)
            if hi > lo:
                pending.append(batch.slice(lo - at, hi - lo))
            at += batch.num_rows
            if at >= piece.hi:
                break
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(file, None, f"not a readable Parquet file ({e})",
                        "re-export the file as Parquet, or use data.dataset: csv") from None
    table, offset = pa.Table.from_batches(pending, schema=pending[0].schema) if pending else None, 0
    while table is not None and offset < table.num_rows:
        yield normalise_table_chunk(table.slice(offset, chunk_rows).to_pandas(), file, read_args["columns"],
                                    read_args["rating"], piece.first_row + offset)
        offset += chunk_rows


def id_partitions(values: np.ndarray, n_parts: int) -> np.ndarray:
    """Partition of each distinct id: pandas' hash of its text, the same in every process (Python's
    hash() is salted per process)."""
    if not len(values):
        return np.zeros(0, np.int64)
    return (pd.util.hash_array(np.asarray(values, dtype=object)) % np.uint64(n_parts)).astype(np.int64)


def _id_file(spill: Path, kind: str, piece: int, part: int) -> Path:
    return spill / f"{kind}id-{piece:05d}-{part:04d}.pkl"


def resolve_ids(kind: str, part: int, spill: Path, n_pieces: int):
    """Partition ``part`` of the ``kind`` ("u" or "i") ids of every piece, in piece order: ``(distinct ids
    (first-appearance order), [(piece, its local codes, their codes within the partition)])``. The id
    files are removed."""
    per_piece, payloads, n = [], [], 0
    for k in range(n_pieces):
        for codes, ids in read_ids(_id_file(spill, kind, k, part)):
            per_piece.append((k, codes, n, n + len(ids)))
            payloads.append(ids)
            n += len(ids)
    within, distinct = factorize_ids(payloads)
    return distinct, [(k, codes, within[lo:hi].astype(np.int32)) for k, codes, lo, hi in per_piece]


def scan_piece(piece: Piece, read_args: dict, min_rating, chunk_rows: int, spill: Path, n_parts: int) -> dict:
    """Rows of the piece (local codes, timestamp, file row) appended to ``spill/scan-<piece>-<part>.bin``,
    the partition a stable hash of the user id (every piece sends a user to the same one); its distinct
    user and item ids to their id files (:func:`resolve_ids`). Returns the piece's numbers of distinct
    users and items, its row counts, the timestamp kind of each chunk, and the first :class:`DataError`
    met (None: none)."""
    users, items = IdCodes(), IdCodes()
    paths = [spill / f"scan-{piece.index:05d}-{p:04d}.bin" for p in range(n_parts)]
    user_part = np.zeros(0, np.int64)
    n_rows = kept = 0
    kinds, error = [], None
    try:
        for df, kind in _frames(piece, read_args, chunk_rows):
            kinds.append((piece.first_row + n_rows, kind))
            rows = np.empty(len(df), ROW)
            new = []
            rows["user"] = users.encode(df["user_id"], new)
            rows["item"] = items.encode(df["item_id"])
            rows["ts"] = df["timestamp"].to_numpy()
            rows["row"] = np.arange(piece.first_row + n_rows, piece.first_row + n_rows + len(df))
            # the new users' partitions only: hashing every row's text cost ~0.7 us a row
            user_part = np.concatenate([user_part, id_partitions(new, n_parts)])
            part = user_part[rows["user"]]
            n_rows += len(df)
            if min_rating is not None:
                keep = df["rating"].to_numpy() >= min_rating
                rows, part = rows[keep], part[keep]
            kept += len(rows)
            spill_rows(paths, rows, part)
        for kind, seen, parts in (("u", users, user_part), ("i", items, id_partitions(items.values(), n_parts))):
            write_ids(lambda q: _id_file(spill, kind, piece.index, q), np.arange(len(seen), dtype=np.int32),
                      seen.values(), parts, n_parts)
    except DataError as e:
        error = e
    return {"users": len(users), "items": len(items), "rows": n_rows, "kept": kept, "kinds": kinds, "error": error}
