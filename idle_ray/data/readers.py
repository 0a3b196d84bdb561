"""Readers for real interaction logs: the interactions (whole or in chunks) and the item table of a dataset.

* :func:`interaction_frames`: the interactions as pandas DataFrames (the whole file, or chunks of
  a bounded number of rows) with columns ``user_id`` (str), ``item_id`` (str), ``timestamp``
  (int64, seconds or any monotone unit), in file order (file order is the tie-break for equal
  timestamps).
* :func:`read_items`: DataFrame ``item_id`` (str), ``title`` (str), or None when there are no titles.
* :func:`read_source`: both, in memory.

Sources: MovieLens-100K and MovieLens-1M shipped in pip packages, and the user's own RecBole atomic
files, CSV or Parquet (:mod:`idle_ray.data.inputs`), read by :mod:`idle_ray.data.tables` and checked by
:mod:`idle_ray.data.normalise`. Bad input raises :class:`DataError` naming the file, the field and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from idle_ray.data.inputs import DataError, input_files
from idle_ray.data.normalise import REQUIRED, normalise_interactions, normalise_items, rename_columns
from idle_ray.data.tables import atomic_frames, read_atomic, table_frames


def interaction_frames(dataset: str, path: str = "", columns: dict | None = None, rating: bool = False,
                       delimiter: str = ",", encoding: str = "utf-8", chunk_rows: int | None = None):
    """The interactions as normalised frames (see :func:`normalise_interactions`) in file order: one
    frame (``chunk_rows`` None) or frames of at most ``chunk_rows`` rows, every check applied to each
    (messages name the row in the file). Arguments as :func:`read_source`."""
    if dataset in ("ml-100k", "ml-1m"):
        file, mapped = input_files(dataset)[0], False
        frames = atomic_frames(file, chunk_rows=chunk_rows)
    else:
        input_files(dataset, path)  # the dataset name and the path, checked
        file, mapped = Path(path), True
        raw = (atomic_frames(file, encoding, chunk_rows) if dataset == "atomic" else
               table_frames(file, dataset, delimiter, encoding, chunk_rows))
        wanted = REQUIRED + (("rating",) if rating else ())
        frames = (rename_columns(df, file, columns, wanted) for df in raw)
    offset, first_kind = 0, None
    for df in frames:
        if len(df) == 0:
            continue
        out, kind = normalise_interactions(df, file, rating, mapped, offset)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise DataError(file, "timestamp", f"stored as {first_kind} before row {offset}, as {kind} from there "
                            "on: their order is ambiguous", "store every timestamp the same way (Unix numbers, or "
                            "ISO-8601 date-times all with a zone or all without)")
        offset += len(df)
        yield out
    if offset == 0:
        raise DataError(file, None, "no rows", "give at least one interaction row")


def read_items(dataset: str, path: str = "", items_path: str = "", columns: dict | None = None,
               delimiter: str = ",", encoding: str = "utf-8") -> pd.DataFrame | None:
    """The item table (``item_id``, ``title``), or None when there are no titles. ML-1M has none: its
    item id *is* the title ("Toy Story (1995)"), which the vocabulary falls back to."""
    if dataset == "ml-100k":
        raw = read_atomic(input_files(dataset)[1])
        year = raw["release_year"].where(raw["release_year"] != "", None)
        title = raw["movie_title"] + np.where(year.notna(), " (" + year.fillna("") + ")", "")
        return pd.DataFrame({"item_id": raw["item_id"].astype(str), "title": title})
    if dataset == "ml-1m":
        return None
    if dataset == "atomic":
        files = input_files(dataset, path, items_path)
        if len(files) == 1:
            return None
        item_file = files[1]
        raw = rename_columns(read_atomic(item_file, encoding), item_file, columns, ("item_id", "title"))
        if "title" not in raw.columns:
            for alt in ("movie_title", "name", "item_name"):
                if alt in raw.columns:
                    raw = raw.rename(columns={alt: "title"})
                    break
        return normalise_items(raw, item_file)
    if not items_path:
        return None
    ip = Path(items_path)
    return normalise_items(rename_columns(next(table_frames(ip, None, delimiter, encoding)), ip, columns,
                                           ("item_id", "title")), ip)


def read_source(dataset: str, path: str = "", items_path: str = "", columns: dict | None = None,
                rating: bool = False, delimiter: str = ",", encoding: str = "utf-8"):
    """Dispatch on ``data.dataset``, reading everything into memory. Returns ``(interactions,
    items_or_None, input_files)``; the interactions carry a ``rating`` column when ``rating`` (for
    ``data.min_rating``). ``columns``: ``data.columns`` as a dict (user, item, timestamp, title,
    rating), for the user's files; ``delimiter`` (CSV) and ``encoding`` (CSV and atomic files):
    ``data.delimiter`` / ``data.encoding``."""
    inter = next(interaction_frames(dataset, path, columns, rating, delimiter, encoding))
    items = read_items(dataset, path, items_path, columns, delimiter, encoding)
    return inter, items, input_files(dataset, path, items_path)
