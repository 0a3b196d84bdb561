"""A real multi-node run: a head with 0 CPUs and two worker nodes, each its own ``ray start`` process on
this machine (own ports, own session), storage on a local S3 server (moto, as ``tests/test_storage.py``).

What it proves (house rule 15: every path a worker reads exists on every node):

* ``jobs/train.py`` with ``data.output_dir`` a local folder is refused before any work: exit code 2,
  one line naming the field and the fix, nothing written.
* With the prepared data, the ID-model artifacts and the run storage in the bucket, the steps of
  ``jobs/train.py`` (``tests/multinode_driver.py``: prepare, pre-train SASRec, train IDLE on the tiny
  decoder with 2 Ray Train workers under DeepSpeed, test) complete while the driver's working folder
  is emptied after every step, and nothing of theirs was ever in it. The head has no CPU, so every
  read task, Train worker and scoring actor ran on the worker nodes; the adapter's two workers (0.6
  CPU each on 1-CPU nodes) ran one on each.
* ``jobs/evaluate.py --run`` from another empty folder finds the run's best weights, the artifact and
  the data in the bucket and reproduces the test metrics exactly.

* ``data.engine: ray`` with the build folder on storage every node mounts runs its scan tasks on both
  worker nodes and writes the local engine's folder byte for byte; with an ``s3://`` output (tasks
  pinned to the driver's node, the 0-CPU head) it is refused at once instead of waiting forever.

On the code before node-independent paths, the pre-training step fails: its workers look for the
prepared data in a local folder of the driver that no longer exists.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ray_nodes import free_ports as _free_ports, stop_node as _stop_head, tail as _tail
from test_storage import BUCKET, _files, s3  # noqa: F401 - s3: the module's S3 server fixture
from idle_ray.train.cluster import torch_extensions_dir
from tiny_jobs import ROOT, run_job, write_tiny_config, write_tiny_data

NODE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
            # the nodes' image has the package (a cluster's gets it from the job's working_dir)
            "PYTHONPATH": str(ROOT),
            # Every node here watches the same machine's memory, used by everything else on it too: Ray's
            # memory monitor would kill this run's actors for others' use (seen on the shared CI box).
            "RAY_memory_monitor_refresh_ms": "0"}


def _start_node(log: Path, args: list[str], env: dict) -> subprocess.Popen:
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           f"--object-store-memory={100 * 1024 ** 2}", f"--dashboard-agent-listen-port={_free_ports(1)[0]}", *args]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def _started(proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return True
        time.sleep(1)
    return False


def _wait_started(procs: list, logs: list[Path], temp_dir: str) -> None:
    if all(_started(p, log) for p, log in zip(procs, logs)):
        return
    raylets = sorted(Path(temp_dir).glob("session_latest/logs/raylet*.out"))
    pytest.fail("Ray nodes not started:\n" + "\n".join(_tail(f, 1500) for f in logs + raylets))


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):  # noqa: F811 - s3 is the imported fixture
    """``(RAY_ADDRESS, env)`` of a 0-CPU head plus nodes ``worker-a`` and ``worker-b`` (1 CPU each). The
    nodes get the S3 endpoint and keys in their environment, as nodes get their credentials."""
    logs = tmp_path_factory.mktemp("nodes")
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dashboard, client = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(NODE_ENV)
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())  # this venv's DeepSpeed build, as ensure_ray
    procs, node_logs = [], []
    try:
        node_logs.append(logs / "head.log")
        procs.append(_start_node(node_logs[-1], [
            "--head", f"--port={gcs}", "--num-cpus=0", "--node-name=head", f"--temp-dir={temp_dir}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}"], env))
        _wait_started(procs, node_logs, temp_dir)
        for name in ("worker-a", "worker-b"):
            for attempt in range(3):  # on a crowded machine a raylet can miss Ray's fixed 30 s start window
                log = logs / f"{name}-{attempt}.log"
                proc = _start_node(log, [f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--node-name={name}"], env)
                if _started(proc, log):
                    break
                _stop_head(proc)
            procs.append(proc)
            node_logs.append(log)
            _wait_started(procs, node_logs, temp_dir)
        yield f"127.0.0.1:{gcs}", {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    finally:
        for proc in reversed(procs):  # workers first, then the head
            _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(1800)  # three Ray nodes and four jobs' worth of Ray start-ups on a shared machine
def test_multinode_run_with_data_and_artifacts_in_the_bucket(cluster, s3, tmp_path):  # noqa: F811
    address, env = cluster
    inputs = tmp_path / "inputs"
    inter, items = write_tiny_data(inputs)
    prefix = f"s3://{BUCKET}/multinode"
    config = write_tiny_config(
        inputs / "tiny.yaml", inter, items, inputs, f"{prefix}/runs",
        data={"output_dir": f"{prefix}/data"},
        id_model={"artifact": "", "artifacts_dir": f"{prefix}/artifacts"},
        train={"num_workers": 2, "cpus_per_worker": 0.6})

    # A local data folder would be read by workers on other nodes: refused before any work.
    local = tmp_path / "local_data"
    r = run_job("train.py", "--config", config, "--set", f"data.output_dir={local}", cwd=tmp_path, env=env,
                timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(f"error: field 'data.output_dir' = '{local}' is a folder on this node only") \
        and "(the cluster has 3 nodes)" in errors[0] and "Fix: --set data.output_dir=s3://BUCKET/" in errors[0]
    assert not local.exists()

    # The train job's steps, the driver's working folder emptied after each.
    work = tmp_path / "driver"
    work.mkdir()
    t0 = time.monotonic()
    log = tmp_path / "driver.log"  # the driver's output, as it comes
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_driver.py"), str(config)], cwd=work,
                           env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + _tail(log, 6000)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"driver: {time.monotonic() - t0:.0f} s; nodes {out['nodes']}; Ray Train workers on "
          f"{out['train_worker_nodes']}")
    assert out["nodes"] == [["head", 0.0], ["worker-a", 1.0], ["worker-b", 1.0]]
    assert out["left"] == {"prepare": [], "pretrain": [], "train": []}  # nothing of the run on the driver's disk
    assert out["prepared"].startswith(f"{prefix}/data/csv-") and out["artifact"].startswith(f"{prefix}/artifacts/")
    # pre-training's worker on one node; the adapter's two workers on both
    assert len(out["train_worker_nodes"]) == 3 and {"worker-a", "worker-b"} == set(out["train_worker_nodes"])
    record = out["record"]
    assert record["epochs"] == 1 and record["steps"] > 0 and record["test"]["users"] == 24
    assert record["checkpoint"].startswith(f"{prefix}/runs/{record['run']}/checkpoint_")
    data_files = _files(s3, out["prepared"][len("s3://"):])
    assert {".complete.json", "manifest.json", "vocab/items.parquet"} <= set(data_files)
    assert {".complete.json", "model.json", "model.safetensors"} <= set(_files(s3, out["artifact"][len("s3://"):]))

    # A later job from another empty folder reads it all back from the bucket.
    work2 = tmp_path / "evaluate"
    work2.mkdir()
    r = run_job("evaluate.py", "--config", config, "--run", record["run"], "--output", tmp_path / "evaluate.json",
                cwd=work2, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    again = json.loads((tmp_path / "evaluate.json").read_text())
    assert again["test"]["full"] == record["test"]["full"] and again["test"]["users"] == 24
    assert list(work2.iterdir()) == []


@pytest.mark.timeout(900)
def test_ray_preparation_spreads_over_the_nodes_and_equals_the_local_engine(cluster, s3, tmp_path):  # noqa: F811
    """``data.engine: ray`` on the 0-CPU head's cluster (issue 14, item 2). With the build folder on
    storage every node mounts (this machine's disk, shared by its three nodes, stands in for NFS) the
    scan tasks run on both worker nodes and the prepared folder is the local engine's byte for byte:
    a local output with ``IDLE_RAY_SHARED_STORAGE=1``, and an ``s3://`` output built in
    ``data.build_dir`` and uploaded. An ``s3://`` output without ``data.build_dir`` is built in the
    driver's own temp folder, so its tasks would be pinned to the head, which has no CPU: refused at
    once, exit 2, naming the fix, nothing uploaded."""
    from idle_ray.data import synthetic
    from idle_ray.data.prepare import prepare_dataset

    address, env = cluster
    log_path = tmp_path / "log.parquet"
    # 600K rows in row groups of 1M: three scan pieces of <= 250K rows, more than one per node
    synthetic.write_synthetic_log(log_path, 600_000, seed=5, log=lambda *a: None)
    config = tmp_path / "prepare.yaml"
    config.write_text(f"name: multinode-prepare\ndata:\n  dataset: parquet\n  path: {log_path}\n"
                      f"  output_dir: {tmp_path / 'shared'}\n  engine: ray\n  rows_per_shard: 500\n")
    work = tmp_path / "driver"
    work.mkdir()
    r = run_job("prepare.py", "--config", config, "--no-stream", cwd=work,
                env={**env, "IDLE_RAY_SHARED_STORAGE": "1"}, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "[prepare] ray: 3 scan task(s)" in out and "[prepare] ray: scan tasks ran on 2 node(s)" in out, out[-3000:]
    ray_dir = next((tmp_path / "shared").glob("parquet-*"))
    local = prepare_dataset("parquet", tmp_path / "local", path=str(log_path), rows_per_shard=500, engine="local",
                            log=lambda *a: None)
    files = sorted(str(p.relative_to(local.path)) for p in local.path.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(ray_dir)) for p in ray_dir.rglob("*") if p.is_file())
    assert len([f for f in files if f.startswith("sequences/")]) == 24
    assert all(filecmp.cmp(local.path / f, ray_dir / f, shallow=False) for f in files)

    bucket = f"s3://{BUCKET}/multinode-prepare"
    in_bucket = ["--set", f"data.output_dir={bucket}/data", "--set", f"id_model.artifacts_dir={bucket}/artifacts",
                 "--set", f"train.storage_path={bucket}/runs"]
    r = run_job("prepare.py", "--config", config, "--no-stream", *in_bucket, "--set",
                f"data.build_dir={tmp_path / 'scratch'}", cwd=work, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "[prepare] ray: scan tasks ran on 2 node(s)" in out and "uploaded s3://" in out, out[-3000:]
    uploaded = f"{BUCKET}/multinode-prepare/data/{local.path.name}"
    assert set(files) <= set(_files(s3, uploaded))
    for f in files:
        with s3.open_input_stream(f"{uploaded}/{f}") as stream:
            assert stream.read() == (local.path / f).read_bytes(), f
    assert list((tmp_path / "scratch").iterdir()) == []  # the build folder went with the upload

    r = run_job("prepare.py", "--config", config, "--no-stream", *in_bucket, "--set",
                f"data.output_dir={bucket}/data2", cwd=work, env=env, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "field 'data.engine'" in errors[0] and "this node has no CPU" in errors[0] \
        and "IDLE_RAY_SHARED_STORAGE=1" in errors[0] and "data.engine: local" in errors[0], errors[0]
    assert _files(s3, f"{BUCKET}/multinode-prepare/data2") == [], "nothing written to the bucket"
