"""Build-once folders (house rule 14): one builder under a file lock, verified, then renamed into place.

Anything several processes may create — the de-quantised LLM cache, a prepared dataset, an
exported ID model — goes through :func:`build_once`:

1. a complete entry (:func:`is_complete`) is returned at once, without taking the lock;
2. otherwise the builder takes ``<parent>/.<name>.lock`` (``filelock``: an ``fcntl`` lock, so it
   also serialises processes of other jobs on the same node, and on NFS mounts that honour POSIX
   locks); a process that has to wait says so in one line;
3. under the lock it looks again (another process may have finished meanwhile); an entry that is
   there but incomplete (a crash, a rename by an older version, a deleted file) is reported in one
   line and removed;
4. ``build(tmp)`` writes into a fresh temp folder beside the final one, ``verify(tmp)`` loads it
   back (raises if anything is missing or unreadable), the list of files with their sizes is
   written as :data:`COMPLETE_MARKER`, and one ``os.rename`` puts the folder in place.

A reader that finds an entry checks the marker against the files (names and sizes), so a folder
that lost a file later is rebuilt, never used.

``final`` may also be an ``s3://`` / ``gs://`` location (:mod:`idle_ray.locations`), for what
processes on other nodes read (prepared data, ID-model artifacts): the lock is then a file in this
node's temp folder, the entry is built and verified in a local temp folder, and its files are
uploaded with the marker last (an object store has no rename; a reader that finds the marker finds
every file it lists). Builders on two nodes at once write the same files, so either upload serves.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from idle_ray import locations

COMPLETE_MARKER = ".complete.json"


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER}


def why_incomplete(folder: str | Path) -> str | None:
    """``None`` when ``folder`` is a complete build-once entry, else the reason in a few words."""
    if locations.is_uri(folder):
        return _why_incomplete_remote(str(folder))
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (an interrupted or foreign build)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    return None


def _why_incomplete_remote(location: str) -> str | None:
    marker = locations.join(location, COMPLETE_MARKER)
    if not locations.exists(marker):
        return "missing" if not locations.exists(location) else f"no {COMPLETE_MARKER} (an interrupted upload)"
    try:
        files = json.loads(locations.read_bytes(marker))["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    for name, size in locations.file_sizes(location, sorted(files)).items():
        if size is None:
            return f"{name} is missing"
        if size != files[name]:
            return f"{name} has {size} bytes, {files[name]} expected"
    return None


def is_complete(folder: str | Path) -> bool:
    return why_incomplete(folder) is None


def mark_complete(folder: str | Path, info: dict | None = None) -> None:
    """Record the files of a finished folder (called on the temp folder, before the rename)."""
    folder = Path(folder)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": _listing(folder), **(info or {})}, indent=1))


def lock_path(final: str | Path) -> Path:
    """``<parent>/.<name>.lock``; for a URI, a file named after it in this node's temp folder."""
    if locations.is_uri(final):
        key = hashlib.sha256(str(final).rstrip("/").encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "idle_ray_locks" / f".{locations.basename(final)}-{key}.lock"
    final = Path(final)
    return final.parent / f".{final.name}.lock"


class BuildLock:
    """The lock that serialises builders of ``final`` (re-entrant within a process).

    ``with BuildLock(final, what, log):`` — logs one line when another process holds it.
    """

    def __init__(self, final: str | Path, what: str, log: Callable[[str], None] = print):
        from filelock import FileLock

        self.final, self.what, self.log = final if locations.is_uri(final) else Path(final), what, log
        lock_path(self.final).parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(lock_path(self.final)))

    def __enter__(self):
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            self.log(f"[{self.what}] another process is building {self.final}; waiting for its lock "
                     f"{lock_path(self.final)}")
            self._lock.acquire()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and isinstance(self.final, Path) and not self.final.exists():
            # A failed first build (e.g. bad input) leaves nothing behind, not even its lock file.
            # (A process still waiting on this lock then holds it on the unlinked file; it will fail
            # the same way, and the next one starts clean.)
            lock_path(self.final).unlink(missing_ok=True)
        self._lock.release()


def remove_incomplete(final: Path, reason: str, what: str, log: Callable[[str], None]) -> None:
    """Move an incomplete entry out of the way (rename first: never delete what others may read)."""
    log(f"[{what}] {final} is incomplete ({reason}); rebuilding it")
    aside = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=final.parent))
    os.rename(final, aside / "entry")
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temps(parent: Path, what: str, log: Callable[[str], None] = print,
                       held: str | None = None) -> list[Path]:
    """Remove the temp folders (``.tmp-<entry>-*``, ``.stale-<entry>-*``) that killed builders left in
    ``parent``. Only a lock holder writes an entry's temp folder, so one whose entry lock can be taken
    now (without waiting) is stale, and so are those of the entry ``held`` (whose lock the caller
    holds); a live builder's (it holds the lock) is left alone."""
    from filelock import FileLock, Timeout
    removed = []
    for tmp in sorted(parent.glob(".tmp-*")) + sorted(parent.glob(".stale-*")):
        prefix = ".tmp-" if tmp.name.startswith(".tmp-") else ".stale-"
        entry = tmp.name[len(prefix):-9]  # mkdtemp adds "-" + 8 random characters
        if not tmp.is_dir() or not entry or tmp.name[-9] != "-":
            continue
        lock = None if entry == held else FileLock(str(lock_path(parent / entry)))
        if lock is not None:
            if not lock_path(parent / entry).exists():
                # A killed builder leaves its lock file. Without one, the builder may be a process that
                # waited on a lock file since unlinked (see BuildLock): only an old folder is stale.
                if time.time() - tmp.stat().st_mtime < 3600:
                    continue
                lock = None
            else:
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # its builder is alive
        try:
            log(f"[{what}] removing {tmp}, left by an interrupted build")
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            if lock is not None:
                lock.release()
    return removed


def build_once(final: str | Path, build: Callable[[Path], None], verify: Callable[[Path], None] | None = None,
               *, what: str, log: Callable[[str], None] = print, info: dict | None = None) -> Path:
    """Return ``final``, building it first if it is not a complete entry (see module docstring).

    ``build(tmp)`` fills the temp folder; ``verify(tmp)`` raises if the result is not usable.
    ``info`` is stored in the marker (e.g. what it was built from).
    """
    final = final if locations.is_uri(final) else Path(final)
    if is_complete(final):
        return final
    with BuildLock(final, what, log):
        return build_locked(final, build, verify, what=what, log=log, info=info)


def build_locked(final: str | Path, build: Callable[[Path], None], verify: Callable[[Path], None] | None = None,
                 *, what: str, log: Callable[[str], None] = print, info: dict | None = None,
                 build_dir: str = "") -> Path:
    """:func:`build_once` for a caller that already holds ``BuildLock(final)`` (a lock is not
    taken twice: ``flock`` on a second descriptor would wait for ourselves). ``build_dir``: where a
    URI's folder is built before its upload (empty: the system's temp folder)."""
    reason = why_incomplete(final)
    if reason is None:  # another process finished it while we waited
        return final
    if locations.is_uri(final):
        return _build_and_upload(str(final), reason, build, verify, what, log, info, build_dir)
    final = Path(final)
    if final.exists() or final.is_symlink():
        remove_incomplete(final, reason, what, log)
    remove_stale_temps(final.parent, what, log, held=final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if verify is not None:
            verify(tmp)
        mark_complete(tmp, info)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # a process on another node (shared storage) won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build_and_upload(final: str, reason: str, build, verify, what: str, log, info: dict | None,
                      build_dir: str = "") -> str:
    """:func:`build_locked` for a URI: build and verify in a local temp folder (in ``build_dir`` when
    given), upload, marker last."""
    if reason != "missing":
        log(f"[{what}] {final} is incomplete ({reason}); rebuilding it")
    if build_dir:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{locations.basename(final)}-", dir=build_dir or None))
    try:
        build(tmp)
        if verify is not None:
            verify(tmp)
        mark_complete(tmp, info)
        locations.upload_folder(tmp, final, last=COMPLETE_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[{what}] uploaded {final}")
    return final
