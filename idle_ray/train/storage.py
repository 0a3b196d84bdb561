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
import time
import uuid
import warnings

import pyarrow.fs as pafs

from idle_ray.config import ConfigError
from idle_ray.locations import absolute, exists, is_uri, join, read_bytes, resolve, uri  # noqa: F401 - this API
from idle_ray.results.files import json_text, write_json

# How long a read of run state waits for storage to come back (an endpoint restarting, a network
# blip) before the run gives up with StorageUnavailable.
OUTAGE_PATIENCE_S = float(os.environ.get("IDLE_RAY_STORAGE_PATIENCE_S", "300"))


class StorageUnavailable(RuntimeError):
    """Storage stayed unreachable for longer than its patience: the run stops, nothing is chosen in its
    place (an older checkpoint would silently lose epochs); a rerun resumes once storage is back."""


def transient(e: BaseException) -> bool:
    """An error a retry may cure: pyarrow's network / endpoint / throttling errors are plain
    ``OSError``s; a missing file, a local permission error or a bad file is an answer, not an outage."""
    return isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                                         PermissionError))


def patiently(fn, what: str, patience_s: float | None = None):
    """``fn()``, retried with backoff (0.5 s doubling to 10 s) while it fails with a :func:`transient`
    error, for up to ``patience_s`` (default :data:`OUTAGE_PATIENCE_S`); then
    :class:`StorageUnavailable` naming ``what`` and the last error."""
    patience_s = OUTAGE_PATIENCE_S if patience_s is None else patience_s
    deadline, wait, warned = time.monotonic() + patience_s, 0.5, False
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not transient(e):
                raise
            if time.monotonic() + wait > deadline:
                raise StorageUnavailable(
                    f"{what}: storage unreachable for {patience_s:.0f} s ({first_line(e)}). Fix: check the endpoint, "
                    f"the network and the credentials; rerunning the same command resumes from the last "
                    f"checkpoint") from None
            if not warned:
                warnings.warn(f"{what}: storage unreachable ({first_line(e)}); retrying for up to {patience_s:.0f} s")
                warned = True
            time.sleep(wait)
            wait = min(wait * 2, 10.0)



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


def check_uri(storage_path: str, field: str = "train.storage_path", write: bool = True, where: str = "") -> None:
    """Fail at config time, with the field and the fix, when a URI cannot hold a run.

    Resolves the URI, checks the bucket exists and (``write``) writes + deletes a small probe
    object, so missing credentials or a read-only role show up now and not after the first epoch.
    ``where`` names the machine in the message when it is not the driver's (e.g. " from a Train
    worker's node 10.0.0.7").
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
                              f"(or is not visible with these credentials){where}. {hint}")
        if write:
            probe = posixpath.join(path, f".idle_ray_probe-{uuid.uuid4().hex}")
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - network, permission and endpoint errors alike
        raise ConfigError(f"field '{field}' = {storage_path!r}: cannot {'write' if write else 'read'} there{where} "
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
        """Copy up; during a storage outage only warn: the next sync copies the same files whole."""
        if self.local == self.location:
            return
        fs, path = resolve(self.location)
        try:
            pafs.copy_files(self.local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as e:
            if not transient(e):
                raise
            warnings.warn(f"{self.location}: not copied now, storage unreachable ({first_line(e)}); "
                          "the next sync copies it")


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
