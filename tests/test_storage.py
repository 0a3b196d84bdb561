"""``train.storage_path`` as an ``s3://`` URI, against a real S3-compatible server (moto's, on a free
local port, started by this module and stopped by its handle).

* A tiny ``jobs/train.py`` run (pre-train SASRec, 2 epochs of IDLE on the tiny decoder with 2 Ray
  Train workers under DeepSpeed ZeRO-2) checkpoints to ``s3://BUCKET/runs/...``: both ranks'
  optimizer shards, the best weights, the step state and the TensorBoard events land in the bucket,
  and the job reads the best weights back from S3 for its test evaluation.
* Rerunning the same job with the latest checkpoint's state corrupted in the bucket resumes the run
  by name from the older checkpoint in S3 (with a warning), trains the missing epoch, and ends with
  the same step count; ``run_best_weights`` finds that run's best weights by listing the bucket.
* ``jobs/recommend.py`` reads that run's weights from the bucket and writes its top-K Parquet and
  manifest to ``s3://BUCKET/recs/...`` (moved from a temp prefix, manifest last), read back whole.
* Misconfigured URIs fail at config time with the field name and the fix: unknown scheme, missing
  bucket, unreachable endpoint, and ``jobs/train.py`` with a missing bucket (exit 2, before Ray starts).
* Credentials are checked where they are used: on a cluster of a 0-CPU head and an autoscaled worker
  node (on 127.0.0.1) that cannot reach the bucket while the driver can, ``jobs/train.py`` stops
  with exit 2 and the worker's node named, before any training writes to the bucket.

The server is ``tests/s3_server.py``'s: the endpoint reaches pyarrow (and so Ray Train and the
jobs) through ``AWS_ENDPOINT_URL``, the variable users set for MinIO / Ceph / other S3-compatible
stores; the keys are moto's dummies.
"""
from __future__ import annotations

import json
import shutil
import socket

import pyarrow.fs as pafs
import pytest

from idle_ray.config import ConfigError
import ray_nodes
from s3_server import S3Server
from tiny_jobs import run_job, write_tiny_config, write_tiny_data

BUCKET = "idle-ray-test"


@pytest.fixture(scope="module")
def s3():
    """A local S3 server; yields an admin ``S3FileSystem`` on it (the env points pyarrow at it too)."""
    server = S3Server()
    server.start()
    mp = pytest.MonkeyPatch()
    try:
        for k, v in server.env().items():
            mp.setenv(k, v)
        fs = server.filesystem()
        fs.create_dir(BUCKET)
        yield fs
    finally:
        mp.undo()
        server.stop()


def _files(fs, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_misconfigured_uri_fails_at_config_time(s3, tmp_path, monkeypatch):
    """The driver's config-time check (a worker node's own check: the worker-node test below), then a
    train job refused with the field and the fix before any work. ``check_uri`` directly: with the
    suite's Ray up, ``launch.check_storage`` also probes from a Ray worker, whose environment has not
    got this test's S3 endpoint."""
    from idle_ray.train.storage import check_uri

    def check_storage(uri, _workers):
        return check_uri(uri)

    check_storage(f"s3://{BUCKET}/runs", 2)  # reachable and writable: no error, nothing left behind
    assert not _files(s3, f"{BUCKET}/runs")
    for uri, says in [("s4://bucket/runs", "not a storage URI"),
                      ("s3://no-such-bucket/runs", "bucket 'no-such-bucket' does not exist")]:
        with pytest.raises(ConfigError) as e:
            check_storage(uri, 2)
        assert "train.storage_path" in str(e.value) and says in str(e.value) and "Fix:" in str(e.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ConfigError) as e:
        check_storage(f"s3://{BUCKET}/runs", 2)
    assert "train.storage_path" in str(e.value) and "cannot write there" in str(e.value)
    assert "AWS_ENDPOINT_URL" in str(e.value)
    monkeypatch.undo()

    inter, items = write_tiny_data(tmp_path)
    config = write_tiny_config(tmp_path / "tiny.yaml", inter, items, tmp_path, "s3://no-such-bucket/runs")
    r = run_job("train.py", "--config", config, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().startswith("error: field 'train.storage_path'") and "Traceback" not in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr  # refused before any work


@pytest.mark.slow  # 5 min; S3 checkpoints stay in the default suite: test_multinode (a whole run in the bucket), test_checkpoint_manifests
def test_train_checkpoints_resumes_and_reads_back_from_s3(s3, tmp_path):
    from idle_ray.config import load_config
    from idle_ray.train.builders import prepare_from_config
    from idle_ray.train.weights import check_adapter_weights, run_best_weights

    storage_path = f"s3://{BUCKET}/runs"
    inter, items = write_tiny_data(tmp_path)
    config = write_tiny_config(tmp_path / "tiny.yaml", inter, items, tmp_path, storage_path, train={"epochs": 2})

    r = run_job("train.py", "--config", config, "--output", tmp_path / "first.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((tmp_path / "first.json").read_text())
    run = first["run"]
    assert first["checkpoint"].startswith(f"{storage_path}/{run}/checkpoint_")
    assert first["epochs"] == 2 and first["test"]["users"] == 24
    files = _files(s3, f"{BUCKET}/runs/{run}")
    ckpts = sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_") and "/" in f})
    assert len(ckpts) == 2
    for c in ckpts:
        for name in ("best_trainable.safetensors", "trainable.safetensors", "train_state.json",
                     "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"):  # each rank uploads its shard
            assert f"{c}/{name}" in files, (c, name, files)
    events = [f for f in files if f.startswith("tensorboard/events.")]
    assert events
    with s3.open_input_stream(f"{BUCKET}/runs/{run}/{events[0]}") as f:
        data = f.read()
    assert b"train/loss" in data and b"val/ndcg_at_10" in data  # synced after the last epoch
    assert any(f.startswith("checkpoint_") for f in _files(s3, f"{BUCKET}/runs/sasrec"))  # pre-training too
    assert not (tmp_path / "runs").exists()

    # Corrupt the latest checkpoint in the bucket: the rerun resumes the run by name from the older one.
    with s3.open_output_stream(f"{BUCKET}/runs/{run}/{ckpts[-1]}/train_state.json") as f:
        f.write(b"{ not json")
    r = run_job("train.py", "--config", config, "--output", tmp_path / "second.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = r.stdout + r.stderr
    assert f"latest checkpoint {BUCKET}/runs/{run}/{ckpts[-1]} is unreadable; resumed from the older " \
           f"{BUCKET}/runs/{run}/{ckpts[0]}" in logs, logs[-4000:]
    assert "[train] resumed at epoch 1" in logs
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["run"] == run and second["epochs"] == 2 and second["steps"] == first["steps"]

    # Reading back: the run's best weights by listing the bucket; they match this config and data.
    cfg = load_config(config)
    weights = run_best_weights(storage_path, run)
    assert weights == f"{second['checkpoint']}/best_trainable.safetensors"
    check_adapter_weights(weights, cfg, prepare_from_config(cfg, log=lambda *a: None), str(tmp_path / "sasrec"))

    # Recommendations from the run's weights in the bucket, written to the bucket, read back.
    recs = f"s3://{BUCKET}/recs/today"
    r = run_job("recommend.py", "--config", config, "--run", run, "--top-k", 3, "--output", recs, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from idle_ray.serve.batch import read_recommendations
    table, manifest = read_recommendations(recs)
    assert manifest["weights"] == weights and manifest["users"] == 24 and table.num_rows == 72
    assert sorted(_files(s3, f"{BUCKET}/recs/today")) == sorted(manifest["files"] + ["manifest.json"])
    assert all(f.startswith("today/") for f in _files(s3, f"{BUCKET}/recs"))  # no temp prefix left beside it


def test_worker_node_that_cannot_write_stops_the_job_before_training(s3, tmp_path):
    """The driver can write the bucket, the nodes where Train workers run cannot (their storage endpoint
    is unreachable, as with a missing instance profile): exit 2 naming that node, nothing trained,
    nothing written under the run's prefix. The cluster: a 0-CPU head on 127.0.0.1 whose autoscaler
    adds worker nodes (``tests/ray_nodes.py``); they inherit the head's environment, the driver has its own."""
    temp_dir = ray_nodes.short_temp_dir("rcw")
    log = tmp_path / "head.log"
    head, gcs, _ = ray_nodes.start_autoscaling_head(log, temp_dir, max_workers=1, worker_cpus=2, env={
        "PYTHONPATH": ray_nodes.repo_pythonpath(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"})
    try:
        assert ray_nodes.wait_started(head, log), ray_nodes.tail(log)
        inter, items = write_tiny_data(tmp_path)
        storage_path = f"s3://{BUCKET}/worker-check"
        config = write_tiny_config(tmp_path / "tiny.yaml", inter, items, tmp_path, storage_path)
        # the driver: this process's moto endpoint; every node is on this machine, so its local data and
        # artifact folders are shared (else the refusal of head-local paths answers first)
        env = {**ray_nodes.node_env(), "RAY_ADDRESS": gcs, "IDLE_RAY_SHARED_STORAGE": "1"}
        r = run_job("train.py", "--config", config, cwd=tmp_path, env=env, timeout=600)
        assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, r.stderr[-4000:]
        assert errors[0].startswith(f"error: field 'train.storage_path' = '{storage_path}': cannot write there "
                                    "from node 127.0.0.1, where Train workers run (the driver could)"), errors
        assert "Fix:" in errors[0] and "Traceback" not in r.stderr
        assert "Connecting to existing Ray cluster" in r.stdout + r.stderr  # the driver joined the head
        assert _files(s3, f"{BUCKET}/worker-check") == []  # no checkpoint, no probe object left
        assert not (tmp_path / "sasrec" / "model.json").exists()  # refused before pre-training
        assert ray_nodes.open_listeners(ray_nodes.owned(head)) == []
    finally:
        ray_nodes.stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
