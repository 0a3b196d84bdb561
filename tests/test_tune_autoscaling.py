"""Ray Tune on an autoscaling cluster that starts with 0 worker nodes.

The cluster is Ray's fake multi-node autoscaling cluster (the ``fake_multinode`` provider that
``ray.cluster_utils.AutoscalingCluster`` drives, started by ``tests/ray_nodes.py``): a 0-CPU head
whose autoscaler starts real worker nodes (raylets) on 127.0.0.1, 2 CPUs each, at most 2, for
pending work (2 CPUs: a Ray Data task that asks a whole CPU still fits beside a trial).

``jobs/tune.py`` joins that cluster (``RAY_ADDRESS``) and runs 2 tiny trials (1 Train worker at
0.5 CPU each, 2 epochs; the ID model is an untrained SASRec artifact the test writes, so no
pre-training runs on the cluster first). When the search starts the cluster has no worker, and
its current size holds no trial; its autoscaler config allows 2 workers of 2 CPUs, room for 5
trials of 0.8 CPU (with their driver and data share). The test checks that the job sized the
search on that maximum (2 trials at once, capped by ``tune.num_samples``, read from the autoscaler
config), that the two trials ran at the same time (their intervals from Tune's result timestamps
overlap), that the cluster grew from 0 worker nodes, and that no node of the cluster listens
beyond 127.0.0.1.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import ray_nodes
from idle_ray.config import load_config
from tiny_jobs import tiny_tune_sets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tune_ml100k.yaml"
MAX_WORKERS = 2
WORKER_CPUS = 2


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """``(gcs_address, dashboard_url, head proc)`` of a fake autoscaling cluster with 0 workers."""
    temp_dir = ray_nodes.short_temp_dir("ras")
    log = tmp_path / "head.log"
    proc, gcs, dashboard = ray_nodes.start_autoscaling_head(
        log, temp_dir, max_workers=MAX_WORKERS, worker_cpus=WORKER_CPUS, env={"PYTHONPATH": ray_nodes.repo_pythonpath()})
    try:
        if not ray_nodes.wait_started(proc, log):
            pytest.fail(f"fake autoscaling head did not start:\n{ray_nodes.tail(log)}")
        yield gcs, dashboard, proc
    finally:
        ray_nodes.stop_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_untrained_id_model(cfg) -> None:
    """The config's ID-model artifact, randomly initialised (the job reuses an artifact it finds): the
    search is what this test runs on the cluster."""
    from idle_ray.models.artifact import save_id_artifact
    from idle_ray.train import builders

    prepared = builders.prepare_from_config(cfg, log=lambda *a: None)
    task, kwargs = builders.build_pretrain_task(cfg, prepared)
    save_id_artifact(task.model, builders.id_artifact_dir(cfg, prepared), name=cfg.id_model.name, kwargs=kwargs,
                     vocab_fingerprint=prepared.manifest["vocab_fingerprint"], data_fingerprint=prepared.fingerprint)


def _worker_nodes(dashboard: str) -> list[dict]:
    """Every worker node that ever joined the cluster (alive or gone), from the head's state API."""
    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100&detail=1", timeout=30) as r:
        nodes = json.load(r)["data"]["result"]["result"]
    return [n for n in nodes if not n["is_head_node"]]


def _trial_intervals(exp: Path) -> dict[str, tuple[float, float]]:
    """Each trial's (start, end) in seconds since the epoch, from its last Tune result row."""
    out = {}
    for d in exp.iterdir():
        f = d / "result.json"
        if d.is_dir() and f.exists():
            last = [json.loads(line) for line in f.read_text().splitlines() if line.strip()][-1]
            out[d.name] = (last["timestamp"] - last["time_total_s"], last["timestamp"])
    return out


@pytest.mark.timeout(900)
def test_search_sizes_on_the_autoscaler_maximum_and_scales_up(autoscaling_cluster, tmp_path, monkeypatch):
    gcs, dashboard, head = autoscaling_cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert _worker_nodes(dashboard) == []  # starts with 0 workers

    sets = tiny_tune_sets(tmp_path, **{"tune.num_samples": 2, "train.epochs": 2, "tune.random_trials": 2})
    write_untrained_id_model(load_config(CONFIG, sets[1::2]))
    env = {**ray_nodes.node_env(), "RAY_ADDRESS": gcs, "RAY_API_SERVER_ADDRESS": dashboard,
           # one machine: every node sees the driver's folders
           "IDLE_RAY_SHARED_STORAGE": "1"}
    cmd = [sys.executable, str(ROOT / "jobs/tune.py"), "--config", str(CONFIG), "--no-test", *sets]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=840)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "Started a local Ray instance" not in out  # joined the cluster
    assert "[pretrain] reusing" in out  # nothing ran on the cluster before the search

    sized = [line for line in r.stdout.splitlines() if "trial(s) at once" in line]
    assert sized and "2 trial(s) at once" in sized[0] and "autoscaler config" in sized[0], sized
    # 2 workers x 2 CPUs are the cluster's maximum (the 0-CPU head adds nothing)
    assert "CPU 4 " in sized[0], sized

    (exp,) = [p for p in (tmp_path / "runs").glob("tune-ml100k-search-*") if (p / "search_space.json").exists()]
    intervals = _trial_intervals(exp)
    assert len(intervals) == 2, intervals
    (s1, e1), (s2, e2) = intervals.values()
    assert max(s1, s2) < min(e1, e2), f"the trials ran one after the other: {intervals}"
    workers = _worker_nodes(dashboard)
    assert 1 <= len(workers) <= MAX_WORKERS, workers

    assert ray_nodes.open_listeners(ray_nodes.owned(head)) == []
