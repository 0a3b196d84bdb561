"""Locations: a local path or an ``s3://`` / ``gs://`` URI, opened through pyarrow filesystems.

Ray Train resolves ``train.storage_path`` with ``pyarrow.fs.FileSystem.from_uri``; the prepared data
(``data.output_dir``), the ID-model artifacts (``id_model.artifacts_dir``) and the run storage are
resolved the same way, so the driver, every worker and a later job see the same files wherever they
run. Endpoints and credentials come from the environment as pyarrow reads them (``AWS_ENDPOINT_URL``,
``AWS_REGION``, instance profiles, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from the config.
A location travels to other processes as a string; :func:`join` and :func:`uri` keep that form.
"""
from __future__ import annotations

import os
import posixpath
import shutil
from pathlib import Path

import pyarrow.fs as pafs

# pyarrow's filesystem type names -> URI schemes
_SCHEMES = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://"}
# Set to 1 where a local path (NFS, ReadWriteMany) is mounted at the same place on every node.
SHARED_STORAGE_ENV = "IDLE_RAY_SHARED_STORAGE"


def is_uri(location) -> bool:
    return "://" in str(location)


def absolute(location) -> str:
    """A URI as it is; a local path made absolute (Ray and Tune read a relative one elsewhere, or
    as a URI without a scheme)."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def resolve(location) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)``; local paths become absolute."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    return pafs.FileSystem.from_uri(str(location))


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` on ``fs`` (e.g. a Ray checkpoint's ``filesystem`` + ``path``)."""
    if fs.type_name == "local":
        return path
    if fs.type_name not in _SCHEMES:
        raise ValueError(f"cannot name a location on a {fs.type_name!r} filesystem")
    return _SCHEMES[fs.type_name] + path.lstrip("/")


def join(location, *parts: str) -> str:
    if is_uri(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return os.path.join(location, *parts)


def basename(location) -> str:
    """The last part of a path or URI (``s3://b/x/name/`` -> ``name``)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def exists(location) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def file_sizes(location, names: list[str]) -> dict[str, int | None]:
    """``{name: size in bytes, or None when it is not a file}`` for files under ``location``."""
    fs, path = resolve(location)
    infos = fs.get_file_info([posixpath.join(path, n) for n in names])
    return {n: (i.size if i.type == pafs.FileType.File else None) for n, i in zip(names, infos)}


def upload_folder(local: str | Path, location: str, last: str) -> None:
    """Copy the files of the local folder ``local`` to ``location``, the file named ``last`` after all
    others (a reader that finds it finds the rest; an older ``last`` is deleted first)."""
    fs, path = resolve(location)
    local = Path(local)
    old = posixpath.join(path, last)
    if fs.get_file_info(old).type == pafs.FileType.File:
        fs.delete_file(old)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.name == last):  # stable: `last` moves to the end
        with open(p, "rb") as src, fs.open_output_stream(posixpath.join(path, p.relative_to(local).as_posix())) as out:
            shutil.copyfileobj(src, out)
