"""Item genres, for plots coloured by genre (the study's Figure 4): MovieLens-100K's ``class`` field (in
``recbole``'s packaged ``ml-100k.item``), or a ``genre`` column of a CSV / Parquet item table
(``data.items_path``) or of a RecBole atomic ``.item`` file. Genres never enter training."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from idle_ray.data.inputs import input_files
from idle_ray.data.tables import read_atomic, table_frames

UNKNOWN = "unknown"
GENRE_COLUMNS = ("genre", "class", "genres")  # the first present is read


def primary_genre(value) -> str:
    """An item's first listed genre (``"Action|Comedy"`` and RecBole's ``"Action Comedy"`` give
    ``"Action"``): one colour per item; MovieLens lists genres in a fixed order, not by weight."""
    text = "" if value is None else str(value).strip()
    if not text or text.lower() == "nan":
        return UNKNOWN
    return text.replace("|", " ").split()[0]


def read_genres(dataset: str, items_path: str = "") -> dict[str, str]:
    """``{original item id: primary genre}``; empty when the data has no genres (ML-1M here has no
    item file; a CSV item table without a genre column)."""
    if dataset == "ml-100k":
        raw = read_atomic(input_files(dataset)[1])
    elif dataset == "atomic" and items_path:
        raw = read_atomic(Path(items_path))
    elif dataset in ("csv", "parquet") and items_path:
        raw = next(table_frames(Path(items_path), None))
    else:
        return {}
    column = next((c for c in GENRE_COLUMNS if c in raw.columns), None)
    if column is None or "item_id" not in raw.columns:
        return {}
    return {str(i): primary_genre(g) for i, g in zip(raw["item_id"], raw[column])}


def dense_genres(vocab_file: str | Path, genres: dict[str, str]) -> list[str]:
    """Primary genre per dense item id (index 0, the padding row, is ``""``) from a prepared dataset's
    ``vocab/items.parquet`` (``item``, ``original_id``); items without one are ``"unknown"``."""
    t = pq.read_table(str(vocab_file), columns=["item", "original_id"])
    items, originals = t["item"].to_pylist(), t["original_id"].to_pylist()
    out = [""] * (max(items, default=0) + 1)
    for i, original in zip(items, originals):
        out[i] = genres.get(str(original), UNKNOWN)
    return out
