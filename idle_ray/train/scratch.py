"""A worker's scratch folders in the node's temp folder, held under a lock for the worker's lifetime,
so that the folders of a killed worker (Ray kills workers on failure, at shutdown, on preemption:
``with tempfile.TemporaryDirectory()`` never exits then) are removed by the next worker on the node.

An ``fcntl`` lock (``filelock``) is released by the kernel when its process dies, in whatever PID
namespace the process ran, so "lock free" means "owner gone" without guessing from process ids.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

OWNER_LOCK = ".owner.lock"
# A folder without its lock file is either being created (mkdtemp, then the lock: a moment) or was
# left by a version without locks; only an old one is removed.
UNLOCKED_GRACE_S = 3600.0


@contextmanager
def scratch_folder(prefix: str) -> Iterator[str]:
    """A fresh ``<tmp>/<prefix>*`` folder, removed on exit; first removes the orphans (folders of
    this prefix whose owner died) in the same temp folder."""
    remove_orphans(prefix)
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        lock = FileLock(os.path.join(folder, OWNER_LOCK))
        lock.acquire()
        try:
            yield folder
        finally:
            lock.release()


def remove_orphans(prefix: str, parent: str | None = None, log=print) -> list[str]:
    """Remove ``<parent>/<prefix>*`` folders whose owner is gone (its lock can be taken now without
    waiting), and unlocked ones older than :data:`UNLOCKED_GRACE_S` -> the names removed."""
    removed = []
    for folder in sorted(Path(parent or tempfile.gettempdir()).glob(prefix + "*")):
        if not folder.is_dir():
            continue
        lock_path = folder / OWNER_LOCK
        try:
            if not lock_path.exists():
                if time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
                continue
            lock = FileLock(str(lock_path), timeout=0)
            with lock:
                shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        except Timeout:
            continue  # a live worker holds it
        except OSError:
            continue  # removed meanwhile by another sweeper, or not ours to remove
    if removed:
        log(f"[train] removed {len(removed)} scratch folder(s) of killed workers: {', '.join(removed[:3])}"
            + (" ..." if len(removed) > 3 else ""))
    return removed
