"""Table files read into raw frames, whole or in chunks: RecBole atomic files, CSV, Parquet (a file or a folder).

Values stay as read (CSV and atomic files: every column text); the checks and the canonical
columns come after (:mod:`idle_ray.data.normalise`). Read errors raise :class:`DataError`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from idle_ray.data.inputs import DataError, check_file

PARQUET_MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    """Parquet files start (and end) with ``PAR1``; a folder is read as a Parquet dataset."""
    if path.is_dir():
        return True
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


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


def atomic_frames(path: Path, encoding: str = "utf-8", chunk_rows: int | None = None):
    """RecBole atomic file: tab-separated, header ``name:type``."""
    check_file(path)

    def parser_error(e):
        return DataError(path, None, f"a row has more tab-separated fields than the header ({_first_line(e)}): "
                         "a tab inside a value?", "remove tabs inside values (atomic files separate fields "
                         "by tabs and do not quote)")
    for df in _csv_frames(path, chunk_rows, encoding, parser_error, sep="\t", quoting=3):
        df.columns = [c.split(":", 1)[0] for c in df.columns]
        yield df


def read_atomic(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    return next(atomic_frames(path, encoding))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _encoding_error(path: Path, encoding: str, e: UnicodeDecodeError) -> DataError:
    return DataError(path, None, f"not {encoding} text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                     "set data.encoding to the file's encoding (e.g. latin-1 or cp1252), or re-save it as UTF-8")


SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe", ",": "comma"}


def table_frames(path: Path, kind: str | None = None, delimiter: str = ",", encoding: str = "utf-8",
                 chunk_rows: int | None = None):
    """A CSV or Parquet table as one frame (``chunk_rows`` None) or frames of at most ``chunk_rows``
    rows, in file order. ``kind`` ("csv" / "parquet", the declared ``data.dataset``) wins over the
    file name; without it (an item table) the content decides. A declared format the file's first
    bytes contradict is an error that says which format it is."""
    check_file(path)
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
        yield from atomic_frames(path, encoding, chunk_rows)
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

