"""A storage outage mid-run: the S3-compatible server (``tests/s3_server.py``, moto) goes down while a
tiny ``jobs/train.py`` run (2 Ray Train workers under DeepSpeed, the tiny decoder, 2 epochs) uploads
its epoch-2 checkpoint, and again when the restarted workers read the checkpoint they resume from.

* Either the upload is retried once the server is back (pyarrow's S3 client retries a failed request)
  or it is cut: then the half-written folder stays in the bucket, Ray Train never registers it, the
  workers restart from the last registered checkpoint (``train.max_failures``), and the resume waits
  for storage to answer instead of reading the outage as a corrupt checkpoint. Both end the same way:
  no fallback to another checkpoint, at most one resume.

Marked ``slow``, and **failing: a known defect (issue #15 item 9)**. Three runs on a quiet machine
(about 70 s each) completed the job with exit 0, but Ray Train *registered* the checkpoint whose
upload was cut although rank 1's optimizer shard (``zero_pp_rank_1_mp_rank_00_optim_states.pt``) is
missing from it: the latest registered checkpoint can be half-written. A resume from it would fall
back to the previous one (the shard does not load), losing an epoch. To do: rank 0 verifies every
rank's files before a checkpoint counts (or Train's upload error reaches the worker), then this test
passes. The wait-instead-of-fallback rule itself is tested in ``tests/test_checkpoints.py``.
* The run completes with the uninterrupted run's epochs and steps, each epoch once in its history;
  the latest registered checkpoint is complete (state, weights, best weights, both ranks' optimizer
  shards) and is what a resume and ``jobs/evaluate.py --run`` read, never the half-written folder.
"""
from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from s3_server import S3Server
from tiny_jobs import run_job, write_tiny_config, write_tiny_data

BUCKET = "idle-ray-outage"
OUTAGE_S = 6.0
EXPECTED = ["best_trainable.safetensors", "trainable.safetensors", "train_state.json",
            "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.fixture
def s3(monkeypatch):
    server = S3Server()
    server.start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.filesystem().create_dir(BUCKET)
        yield server
    finally:
        server.stop()


def _files(fs, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


class CheckpointUploads:
    """Outage triggers on the adapter run's requests: the second object put into its second checkpoint
    folder (the first one is then in place: the folder is half-written), then the first read of a
    checkpoint's state once the server is back (the restarted workers' resume)."""

    def __init__(self, server: S3Server):
        self.server, self.folders, self.puts = server, [], 0

    def upload(self, method: str, path: str) -> bool:
        parts = path.strip("/").split("/")
        if method != "PUT" or path.endswith("/") or len(parts) < 5 or not parts[2].startswith("tiny-idle-") or \
                not parts[3].startswith("checkpoint_"):  # a file (not a folder marker) in a checkpoint
            return False
        if parts[3] not in self.folders:
            self.folders.append(parts[3])
        self.puts += len(self.folders) == 2
        if self.puts == 2:
            self.server.outage_at(self.resume, OUTAGE_S)  # armed now, fires after the server is back
            return True
        return False

    def resume(self, method: str, path: str) -> bool:
        return method in ("GET", "HEAD") and path.endswith("/train_state.json") and "/tiny-idle-" in path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_rides_out_a_storage_outage(s3, tmp_path):
    from idle_ray.train.checkpoints import TRAIN_SNAPSHOT, resume_state
    from idle_ray.train.weights import run_best_weights

    storage_path = f"s3://{BUCKET}/runs"
    inter, items = write_tiny_data(tmp_path)
    config = write_tiny_config(tmp_path / "tiny.yaml", inter, items, tmp_path, storage_path, train={"epochs": 2})
    uploads = CheckpointUploads(s3)
    s3.outage_at(uploads.upload, OUTAGE_S)

    r = run_job("train.py", "--config", config, "--output", tmp_path / "train.json", cwd=tmp_path, timeout=840)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-5000:]
    assert 1 <= len(s3.outages) <= 2, (s3.outages, logs[-3000:])
    assert s3.outages[0][2].startswith("PUT /"), s3.outages  # the server went down mid-upload
    restarted = len(s3.outages) == 2
    if restarted:  # the cut upload restarted the workers; their resume read met the second outage
        assert s3.outages[1][2].endswith("/train_state.json"), s3.outages
        assert "storage unreachable" in logs  # the resume waited, and said so
    assert "trying an older one" not in logs and "unreadable; resumed from the older" not in logs

    record = json.loads((tmp_path / "train.json").read_text())
    run = record["run"]
    fs = s3.filesystem()
    snapshot = json.loads(fs.open_input_stream(f"{BUCKET}/runs/{run}/{TRAIN_SNAPSHOT}").read())
    registered = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert latest == registered[-1] and record["checkpoint"] == f"{storage_path}/{run}/{latest}"

    files = _files(fs, f"{BUCKET}/runs/{run}")
    folders = sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_")})
    half = uploads.folders[1]
    if restarted:  # the cut upload: in the bucket, half-written, never registered
        assert half in folders and half not in registered
        assert [f"{half}/{name}" for name in EXPECTED if f"{half}/{name}" not in files], "not half-written"
    for name in registered:  # every registered checkpoint is complete
        assert all(f"{name}/{e}" in files for e in EXPECTED), (name, files)

    # Epochs and steps of an uninterrupted run: 2 epochs, each once, the same steps per epoch.
    location, state = resume_state(f"{storage_path}/{run}")
    assert location == f"{BUCKET}/runs/{run}/{latest}" or location.endswith(f"{run}/{latest}")
    assert [h["epoch"] for h in state["history"]] == [1, 2] and state["epoch"] == 2 == record["epochs"]
    steps = [h["step"] for h in state["history"]]
    assert steps == [steps[0], 2 * steps[0]] and record["steps"] == steps[-1]
    assert [r["epoch"] for r in state["resumes"]] == ([1] if restarted else [])  # from epoch 1's checkpoint
    assert not any(r["fallback"] for r in state["resumes"])
    assert run_best_weights(storage_path, run).startswith(f"{storage_path}/{run}/checkpoint_")
