"""Read frames made canonical: data.columns renamed; ids, timestamps, ratings and item tables checked.

Interactions become ``user_id``, ``item_id`` (str), ``timestamp`` (int64, seconds or any monotone
unit, order kept exactly) and optionally ``rating`` (float64); item tables ``item_id``, ``title``
(str), one title per item. Bad values raise :class:`DataError` naming the file, the row and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from idle_ray.data.inputs import DataError

REQUIRED = ("user_id", "item_id", "timestamp")
# canonical column -> the data.columns field that names it in the user's files
COLUMN_FIELDS = {"user_id": "user", "item_id": "item", "timestamp": "timestamp", "title": "title", "rating": "rating"}


def rename_columns(df: pd.DataFrame, path: Path, columns: dict | None, wanted: tuple) -> pd.DataFrame:
    """Rename the user's columns (``data.columns``) to the canonical names in ``wanted``."""
    if not columns:
        return df
    mapping = {}
    for canonical in wanted:
        name = columns.get(COLUMN_FIELDS[canonical], canonical)
        if name != canonical:
            if name not in df.columns:
                raise DataError(path, f"data.columns.{COLUMN_FIELDS[canonical]}",
                                f"column {name!r} not in the file (columns are {list(df.columns)})",
                                f"set data.columns.{COLUMN_FIELDS[canonical]} to one of those names")
            mapping[name] = canonical
    return df.drop(columns=[c for c in mapping.values() if c in df.columns]).rename(columns=mapping)


INT64_MAX = np.iinfo(np.int64).max
_ZONED = r"\d\d:\d\d(?::\d\d(?:\.\d+)?)?\s*(?:Z|[+-]\d\d:?\d\d)$"  # a time with a zone suffix


def _check_scalar(col: pd.Series, path: Path, name: str, offset: int = 0) -> None:
    """Ids and titles are one value per row: list, array or mapping cells (a Parquet list column)
    would otherwise turn into strings like "[1 2]". ``offset``: the file row of ``col``'s first row."""
    if col.dtype != object or len(col) == 0:
        return
    nested = col.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).to_numpy()
    if nested.any():
        row = int(np.flatnonzero(nested)[0])
        raise DataError(path, name, f"list-typed values (e.g. {col.iloc[row]!r} in row {row + offset})",
                        f"store one {name} per row (explode the list first)")


def _timestamps(ts: pd.Series, path: Path, offset: int = 0) -> tuple[np.ndarray, str]:
    """int64 timestamps, order kept exactly: integers as they are, ISO-8601 text and datetime
    columns as UTC nanoseconds; fractional numbers and values outside int64 are refused (truncating
    them would merge or reorder rows). Also returns how they were stored ("datetime", "number",
    "ISO-8601 without a zone", "ISO-8601 with a zone"): the chunks of one file must agree.
    ``offset``: the file row of ``ts``'s first row (for the messages)."""
    def first(mask) -> tuple[int, object]:
        row = int(np.flatnonzero(np.asarray(mask))[0])
        value = ts.iloc[row]
        return row + offset, value.item() if isinstance(value, np.generic) else value

    if pd.api.types.is_bool_dtype(ts):
        raise DataError(path, "timestamp", "boolean column", "store timestamps as numbers")
    if pd.api.types.is_datetime64_any_dtype(ts):
        if ts.isna().any():
            row, _ = first(ts.isna())
            raise DataError(path, "timestamp", f"{int(ts.isna().sum())} missing value(s), first at row {row}",
                            "fill or drop the rows without a timestamp")
        if getattr(ts.dt, "tz", None) is not None:
            ts = ts.dt.tz_convert("UTC")
        return ts.dt.as_unit("ns").astype(np.int64).to_numpy(), "datetime"
    if not pd.api.types.is_numeric_dtype(ts):
        text = ts.astype(str).str.strip()
        missing = (text == "") | ts.isna().to_numpy()
        if missing.any():
            row, _ = first(missing)
            raise DataError(path, "timestamp", f"{int(missing.sum())} missing/NaN value(s), first at row {row}",
                            "fill or drop the rows without a timestamp")
        num = pd.to_numeric(text, errors="coerce")
        if num.notna().all():
            ts = num
        elif num.notna().any() and not text[num.isna()].str.fullmatch(r"[+-]?(?:nan|inf(?:inity)?)", case=False).all():
            # ISO-8601 would read a bare number as a year ("1400"): refuse the mix rather than guess
            (rn, vn), (rd, vd) = first(num.notna()), first(num.isna())
            raise DataError(path, "timestamp", f"a mix of numbers ({vn!r}, row {rn}) and text ({vd!r}, row {rd})",
                            "store every timestamp the same way: Unix numbers, or ISO-8601 date-times")
        else:
            parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
            if parsed.isna().any():
                row, v = first(parsed.isna().to_numpy())
                raise DataError(path, "timestamp", f"neither a number nor an ISO-8601 date-time (e.g. {v!r} in "
                                f"row {row})", "store Unix times or ISO-8601 date-times like 2020-01-01T10:00:00Z")
            zoned = text.str.contains(_ZONED, regex=True).to_numpy()
            if zoned.any() and not zoned.all():
                (rz, vz), (rn, vn) = first(zoned), first(~zoned)
                raise DataError(path, "timestamp", f"a mix of date-times with a time zone ({vz!r}, row {rz}) and "
                                f"without one ({vn!r}, row {rn}): their order is ambiguous",
                                "give every value a zone (e.g. Z for UTC) or none (then all are read as UTC)")
            kind = "ISO-8601 with a zone" if zoned.any() else "ISO-8601 without a zone"
            return parsed.dt.tz_localize(None).astype("datetime64[ns]").to_numpy().astype(np.int64), kind
    if ts.isna().any():
        row, _ = first(ts.isna())
        raise DataError(path, "timestamp", f"{int(ts.isna().sum())} missing/NaN value(s), first at row {row}",
                        "fill or drop the rows without a timestamp")
    values = ts.to_numpy()
    if (values < 0).any():
        row, _ = first(values < 0)
        raise DataError(path, "timestamp", f"{int((values < 0).sum())} negative value(s), first at row {row}",
                        "timestamps must be >= 0 (e.g. Unix seconds)")
    if np.issubdtype(values.dtype, np.floating):
        frac = values != np.floor(values)
        if frac.any():
            row, v = first(frac)
            raise DataError(path, "timestamp", f"fractional value {v!r} in row {row}: truncating would merge rows "
                            "that differ only in the fraction", "store integer units (e.g. milliseconds: "
                            "multiply by 1000 and round)")
        if (values > 2.0 ** 53).any():
            row, v = first(values > 2.0 ** 53)
            raise DataError(path, "timestamp", f"{v!r} in row {row} is stored as a float above 2^53, where floats "
                            "skip integers (the order may be wrong)", "store timestamps as integers")
        return values.astype(np.int64), "number"
    if values.dtype == np.uint64 and (values > np.uint64(INT64_MAX)).any():
        row, v = first(values > np.uint64(INT64_MAX))
        raise DataError(path, "timestamp", f"{v!r} in row {row} is above {INT64_MAX} (int64)",
                        "store timestamps in a smaller unit (e.g. seconds or milliseconds)")
    return values.astype(np.int64), "number"


def normalise_interactions(df: pd.DataFrame, path: Path, rating: bool = False, mapped: bool = False,
                           offset: int = 0) -> tuple[pd.DataFrame, str]:
    """Canonical ``user_id``, ``item_id`` (str), ``timestamp`` (int64) and, with ``rating``, ``rating``
    (float64), and how the timestamps were stored (see :func:`_timestamps`). ``df`` is a chunk of the
    file that starts at row ``offset``."""
    for col in REQUIRED + (("rating",) if rating else ()):
        if col not in df.columns:
            hint = (f"or set data.columns.{COLUMN_FIELDS[col]} to the name yours has" if mapped else
                    "this packaged file has fixed column names")
            if col == "rating":
                hint += ", or set data.min_rating: null to keep every row"
            raise DataError(path, col, f"required column missing (columns are {list(df.columns)})",
                            f"add a '{col}' column (needed: {', '.join(REQUIRED)}), {hint}")
    for col in ("user_id", "item_id"):
        _check_scalar(df[col], path, col, offset)
    ts, kind = _timestamps(df["timestamp"], path, offset)
    for col in ("user_id", "item_id"):
        if df[col].isna().any() or (df[col].astype(str) == "").any():
            raise DataError(path, col, "missing (empty) ids", f"fill or drop rows without a {col}")
    out = pd.DataFrame({
        "user_id": df["user_id"].astype(str).array,
        "item_id": df["item_id"].astype(str).array,
        "timestamp": ts,
    })
    if rating:
        raw = df["rating"]
        values = pd.to_numeric(raw.replace("", np.nan) if raw.dtype == object else raw, errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(path, "rating", f"{int(bad.sum())} missing or non-numeric rating(s), first "
                            f"{raw.iloc[row]!r} at row {row + offset}", "fill or drop those rows, or set "
                            "data.min_rating: null")
        out["rating"] = values.to_numpy(dtype=np.float64)
    return out, kind


def normalise_items(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    for col in ("item_id", "title"):
        if col not in df.columns:
            raise DataError(path, col, f"required column missing in the item table (columns are {list(df.columns)})",
                            "give an item table with item_id and title columns")
    for col in ("item_id", "title"):
        _check_scalar(df[col], path, col)
        empty = df[col].isna().to_numpy() | (df[col].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise DataError(path, col, f"{int(empty.sum())} missing (null or empty) value(s), first at row {row}",
                            f"fill or drop the item rows without a {col}")
    items = pd.DataFrame({"item_id": df["item_id"].astype(str), "title": df["title"].astype(str)})
    dup = items[items.duplicated("item_id", keep=False)]
    if len(dup):
        conflicting = dup.groupby("item_id")["title"].nunique()
        conflicting = conflicting[conflicting > 1]
        if len(conflicting):
            raise DataError(path, "item_id", f"{len(conflicting)} item id(s) with different titles, e.g. "
                            f"{conflicting.index[0]!r}", "keep one title per item_id")
        items = items.drop_duplicates("item_id")
    return items.reset_index(drop=True)


def normalise_table_chunk(df: pd.DataFrame, file: Path, columns: dict | None, rating: bool,
                          offset: int) -> tuple[pd.DataFrame, str]:
    """A chunk of the user's own table as read (file row ``offset`` first): ``data.columns`` renamed, then
    every check of :func:`readers.interaction_frames` on it; returns the frame and how timestamps were stored."""
    wanted = REQUIRED + (("rating",) if rating else ())
    return normalise_interactions(rename_columns(df, file, columns, wanted), file, rating, True, offset)
