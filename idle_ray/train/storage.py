"""Run storage: a local folder, an NFS mount or an ``s3://`` / ``gs://`` URI, through pyarrow filesystems.

A *location* is a local path or a URI (``s3://bucket/key``), resolved as Ray Train resolves
``train.storage_path`` (:mod:`idle_ray.locations`, whose functions this module re-exports), so the
driver, the workers and a later job (``jobs/evaluate.py --run``) see the same files.
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid

import pyarrow.fs as pafs

from idle_ray.config import ConfigError
from idle_ray.locations import absolute, exists, is_uri, join, read_bytes, resolve, uri  # noqa: F401 - this API
from idle_ray.results.files import json_text, write_json


def subfolders(location: str, prefix: str = "") -> list[str]:
    """Names of the folders directly under ``location`` that start with ``prefix``, sorted."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))


def checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint folders (Ray Train names them ``checkpoint_<timestamp>``), newest first."""
    return [join(run_dir, name) for name in reversed(subfolders(run_dir, "checkpoint_"))]


def check_uri(storage_path: str, field: str = "train.storage_path", write: bool = True) -> None:
    """Fail at config time, with the field and the fix, when a URI cannot hold a run.

    Resolves the URI, checks the bucket exists and (``write``) writes + deletes a small probe
    object, so missing credentials or a read-only role show up now and not after the first epoch.
    """
    hint = ("Fix: check the bucket name, the machine's credentials (instance profile / service account / "
            "AWS_* or GOOGLE_APPLICATION_CREDENTIALS variables) and, for an S3-compatible server, "
            "AWS_ENDPOINT_URL; or use a local/NFS folder")
    try:
        fs, path = resolve(storage_path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for unknown schemes
        raise ConfigError(f"field '{field}' = {storage_path!r}: not a storage URI pyarrow can open "
                          f"({first_line(e)}). Fix: use s3://BUCKET/PATH, gs://BUCKET/PATH or a folder") from None
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"field '{field}' = {storage_path!r}: no bucket in the URI. Fix: use s3://BUCKET/PATH")
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"field '{field}' = {storage_path!r}: bucket {bucket!r} does not exist "
                              f"(or is not visible with these credentials). {hint}")
        if write:
            probe = posixpath.join(path, f".idle_ray_probe-{uuid.uuid4().hex}")
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - network, permission and endpoint errors alike
        raise ConfigError(f"field '{field}' = {storage_path!r}: cannot {'write' if write else 'read'} there "
                          f"({first_line(e)}). "
                          f"{hint}") from None


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class MirroredFolder:
    """A local folder for writers that only write local files (TensorBoard), copied to ``location``.

    For a local ``location`` the writer writes there directly and :meth:`sync` does nothing; for a
    URI it writes to a temp folder that :meth:`sync` copies up (whole files, overwriting).
    """

    def __init__(self, location: str):
        self.location = location
        self.local = tempfile.mkdtemp(prefix="idle_ray_mirror_") if is_uri(location) else location

    def sync(self) -> None:
        if self.local == self.location:
            return
        fs, path = resolve(self.location)
        pafs.copy_files(self.local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_json_in(folder: str, name: str, obj) -> str:
    """``folder/name`` for a local folder (atomic) or an ``s3://`` / ``gs://`` prefix (an object
    store's put is atomic itself)."""
    if not is_uri(folder):
        return str(write_json(os.path.join(folder, name), obj))
    fs, path = resolve(join(folder, name))
    with fs.open_output_stream(path) as f:
        f.write(json_text(obj).encode())
    return join(folder, name)


def read_json_in(folder: str, name: str) -> dict | None:
    """``folder/name`` parsed, or None when it does not exist."""
    location = join(folder, name)
    return json.loads(read_bytes(location)) if exists(location) else None
