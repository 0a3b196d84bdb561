"""Complete checkpoints: every rank puts its own files on storage, checks them there, and writes its manifest last.

A checkpoint folder is complete when, for every rank ``r`` of the world rank 0's manifest names, the
folder holds ``manifest_rank<r>.json`` and every file that manifest lists. A manifest is written only
after its files are on storage (retried through an outage with :func:`storage.patiently`, then read
back), so a folder whose upload was cut lacks a manifest or a file and is never resumed from nor
evaluated (:func:`missing`). Ray Train's own upload is not relied on: the worker uploads through
``checkpoint_upload_fn`` (:func:`publish`), and Train registers the checkpoint only once every rank's
call has returned.
"""
from __future__ import annotations

import json
import os
import posixpath

import pyarrow.fs as pafs

from idle_ray.train import storage


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint folder on storage lacks a rank's manifest or a file a manifest lists."""


def manifest_name(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def local_files(folder: str) -> dict[str, int]:
    """``{relative posix path: size in bytes}`` of every file under the local ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return dict(sorted(out.items()))


def _put(fs, source: str, dest: str) -> None:
    # A whole-file put: a retry after a cut upload starts the file again (an object store's put is atomic).
    with open(source, "rb") as src, fs.open_output_stream(dest) as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)


def _where(fs, path: str) -> str:
    try:
        return storage.uri(fs, path)
    except ValueError:  # a filesystem without a URI scheme of its own
        return path


def _sizes(fs, path: str, names) -> dict[str, int | None]:
    """Size of each ``path/name`` on storage, ``None`` when it is not there (an outage is waited out)."""
    infos = storage.patiently(lambda: fs.get_file_info([posixpath.join(path, n) for n in names]),
                              f"listing {_where(fs, path)}")
    return {n: (i.size if i.type == pafs.FileType.File else None) for n, i in zip(names, infos)}


def publish(local_dir: str, fs, dest: str, rank: int, world: int) -> None:
    """Upload this rank's part of a checkpoint (``local_dir``) to ``dest`` on ``fs``, check every file is
    there with its size, then write this rank's manifest. An outage is retried (its patience, then
    :class:`storage.StorageUnavailable`); a file storage does not show after its upload raises
    :class:`IncompleteCheckpoint`: either way no manifest is written and the checkpoint never counts."""
    files = local_files(local_dir)
    where = _where(fs, dest)
    local = fs.type_name == "local"  # an object store has no folders to make
    if local:
        # The folder itself too: a rank with no files of its own (rank 1 under ZeRO-0, where DeepSpeed
        # writes only on rank 0) may write its manifest before any other rank made the folder.
        fs.create_dir(dest)
    for rel in files:
        target = posixpath.join(dest, rel)
        if local:
            fs.create_dir(posixpath.dirname(target))
        storage.patiently(lambda: _put(fs, os.path.join(local_dir, rel), target),
                          f"uploading rank {rank}'s {rel} to {where}")
    there = _sizes(fs, dest, list(files))
    wrong = [f"{rel} ({there[rel]} bytes on storage, {size} written)" if there[rel] is not None else f"{rel} (absent)"
             for rel, size in files.items() if there[rel] != size]
    if wrong:
        raise IncompleteCheckpoint(
            f"{where}: rank {rank}'s checkpoint upload returned but storage does not hold {', '.join(wrong)}. "
            "Fix: check the storage (quota, lifecycle rules, another writer on train.storage_path); rerunning "
            "the same command resumes from the last complete checkpoint")
    manifest = json.dumps({"rank": rank, "world": world, "files": files}, indent=1).encode()
    target = posixpath.join(dest, manifest_name(rank))

    def put_manifest():
        with fs.open_output_stream(target) as out:
            out.write(manifest)
    storage.patiently(put_manifest, f"writing rank {rank}'s manifest to {where}")


def _read_manifest(fs, path: str, rank: int) -> dict | None:
    def read():
        with fs.open_input_stream(posixpath.join(path, manifest_name(rank))) as f:
            return f.read()
    try:
        return json.loads(storage.patiently(read, f"reading {_where(fs, path)}/{manifest_name(rank)}"))
    except FileNotFoundError:
        return None


def missing(fs, path: str) -> list[str]:
    """What the checkpoint folder ``path`` on ``fs`` lacks to be complete (``[]`` when complete): rank
    manifests and the files they list, as paths relative to the folder. Reads only; an outage is
    waited out (:class:`storage.StorageUnavailable`), never read as "incomplete"."""
    first = _read_manifest(fs, path, 0)
    if first is None:
        return [manifest_name(0)]
    gaps = []
    for rank in range(int(first["world"])):
        manifest = first if rank == 0 else _read_manifest(fs, path, rank)
        if manifest is None:
            gaps.append(manifest_name(rank))
            continue
        there = _sizes(fs, path, list(manifest["files"]))
        gaps += [name for name, size in there.items() if size is None]
    return gaps


def require_complete(fs, path: str) -> None:
    """Raise :class:`IncompleteCheckpoint` naming the folder, what it lacks and the fix."""
    gaps = missing(fs, path)
    if gaps:
        raise IncompleteCheckpoint(
            f"{_where(fs, path)}: incomplete checkpoint, it lacks {', '.join(gaps[:5])}"
            f"{' and more' if len(gaps) > 5 else ''} (an upload was cut). Fix: rerun the same command to resume "
            "from the last complete checkpoint, or delete this folder")
