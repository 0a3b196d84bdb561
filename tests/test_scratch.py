"""A worker's scratch folder: removed on exit, and after a kill by the next worker, never while its owner lives."""
import os
import signal
import subprocess
import sys
import time

from idle_ray.train.scratch import OWNER_LOCK, UNLOCKED_GRACE_S, remove_orphans, scratch_folder

HOLDER = """
import sys, time
from idle_ray.train.scratch import scratch_folder
with scratch_folder("idle_ray_worker_") as d:
    open(d + "/best_trainable.safetensors", "wb").write(b"x" * 1000)
    print(d, flush=True)
    time.sleep(600)
"""


def _holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    folder = proc.stdout.readline().strip()
    assert folder.startswith(str(tmp_path)) and os.path.isdir(folder)
    return proc, folder


def test_killed_workers_folder_is_removed_by_the_next_but_a_live_ones_is_kept(tmp_path):
    live, live_folder = _holder(tmp_path)
    killed, killed_folder = _holder(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)  # what Ray does to a worker: no `finally`, no cleanup
        killed.wait(timeout=30)
        assert os.path.isdir(killed_folder)
        removed = remove_orphans("idle_ray_worker_", str(tmp_path), log=lambda _: None)
        assert removed == [os.path.basename(killed_folder)]
        assert not os.path.exists(killed_folder)
        assert os.path.isfile(os.path.join(live_folder, "best_trainable.safetensors"))
    finally:
        live.kill()
        live.wait(timeout=30)
    # once its owner is gone too, the next sweep takes it
    assert remove_orphans("idle_ray_worker_", str(tmp_path), log=lambda _: None) == [os.path.basename(live_folder)]


def test_scratch_folder_sweeps_then_is_removed_on_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    stale = tmp_path / "idle_ray_worker_old"
    stale.mkdir()  # left by a version without the lock file: removed only once old
    fresh = tmp_path / "idle_ray_worker_new"
    fresh.mkdir()
    old = time.time() - UNLOCKED_GRACE_S - 60
    os.utime(stale, (old, old))
    other = tmp_path / "something_else"
    other.mkdir()
    with scratch_folder("idle_ray_worker_") as d:
        assert os.path.isfile(os.path.join(d, OWNER_LOCK))
        assert not stale.exists() and fresh.exists() and other.exists()
        # its own folder is held: a sweep from another worker leaves it
        assert os.path.basename(d) not in remove_orphans("idle_ray_worker_", str(tmp_path), log=lambda _: None)
        assert os.path.isdir(d)
    assert not os.path.exists(d)
