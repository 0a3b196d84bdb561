"""`ray job submit` against a real local Ray head, end to end.

What this proves: the documented cluster path (``ray job submit --working-dir . -- python
jobs/prepare.py ...``) works, not just the embedded ``ray.init()`` path the other tests use.
The test starts its own ``ray start --head --block`` subprocess (``tests/ray_nodes.py``: own ports
on 127.0.0.1, own temp dir, own process group), submits ``jobs/prepare.py`` through
``JobSubmissionClient`` with the repository uploaded as the runtime-env ``working_dir``
(virtualenvs and data folders excluded), and checks that

* the job SUCCEEDS, the driver (this test's interpreter) connects to the head (not to a new
  embedded Ray), writes ``<out>/csv-*/manifest.json`` with the right user count, and logs the
  Ray Data streaming check ("streamed") and the result ("prepared");
* a job pointing at a missing file ends FAILED (exit code 2) with the one-line "file not found"
  error and writes nothing;
* a tiny training job (``jobs/train.py`` with a YAML written by the test: pre-train a 16-wide
  SASRec, train IDLE on the 'tiny-decoder' backbone with 2 Ray Train workers at 0.5 CPU under
  DeepSpeed, test once) SUCCEEDS on the head's 2 CPUs and leaves its result JSON, the exported ID
  model and an adapter checkpoint (best weights + step state) in the test's folders;
* after those jobs, no process of the head (GCS, raylet, dashboard, agents, workers) listens on any
  address but 127.0.0.1.

Note: ``python`` in an entrypoint is resolved through the head's PATH, not the head's
interpreter; a head started as ``.venv/bin/ray start`` without an activated venv runs the
system ``python`` there (``ModuleNotFoundError``). The entrypoint therefore names this test's
interpreter (``sys.executable``) explicitly.

One head serves the module's tests. It is stopped through its own process group in the fixture
teardown (never ``ray stop``), and the tests never call ``ray.init()``, so other Ray instances on
the machine are untouched.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import ray_nodes
from tiny_jobs import write_tiny_config

REPO = Path(__file__).resolve().parents[1]
# Anchored at the working dir ("/results", not "results": that would also drop idle_ray/results/).
EXCLUDES = ["/.venv", "/.venv-recbole", "/data_cache", "/runs", "/artifacts", "/results", "/.git"]
RUNTIME_ENV = {
    "working_dir": str(REPO),
    "excludes": EXCLUDES,
    "env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
}
N_USERS = 30
N_ITEMS = 20


def _start_head(log_path: Path):
    """The module's head (2 CPUs, loopback only); ``(proc, dashboard_address, temp_dir)``."""
    temp_dir = ray_nodes.short_temp_dir("rjs")  # also keeps its session files away from /tmp/ray
    proc, _, dashboard = ray_nodes.start_head(log_path, temp_dir, num_cpus=2)
    return proc, dashboard, temp_dir


def _wait_ready(proc: subprocess.Popen, address: str, log_path: Path, timeout_s: float = 90.0):
    """The head's ``JobSubmissionClient`` once the node is up and the job API answers, else None."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        # `ray start` prints this after the raylet registered; the dashboard can answer earlier,
        # while `ray start` may still fail ("The current node timed out during startup").
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()  # the job API answers, not only /api/version
                return client
            except Exception:  # noqa: BLE001 - dashboard still starting
                pass
        time.sleep(1)
    return None


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A throw-away local Ray head owned by this module; yields ``(JobSubmissionClient, address, proc)``."""
    # Token authentication is disabled for this throw-away head only: it listens on free local
    # ports, lives for this module's tests and is killed in the teardown. Real clusters keep token
    # auth (README "Ray, authentication and local runs", docs/cluster.md). Both sides get the
    # setting: the head (and hence its job drivers) and, here, the submitting client.
    tmp_path = tmp_path_factory.mktemp("head")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    started = []  # (proc, temp_dir) of every head this fixture started
    try:
        client = None
        for attempt in range(2):  # on a crowded machine the raylet can miss Ray's fixed 30 s start window
            log_path = tmp_path / f"head{attempt}.log"
            proc, address, temp_dir = _start_head(log_path)
            started.append((proc, temp_dir))
            client = _wait_ready(proc, address, log_path)
            if client is not None:
                break
            ray_nodes.stop_node(proc)
        if client is None:
            pytest.fail(f"local Ray head did not start (twice):\n{ray_nodes.tail(log_path)}")
        # The head really runs without token auth (the env reached it), as this test assumes.
        with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=10) as r:
            assert json.load(r)["authentication_mode"] == "disabled"
        yield client, address, proc
    finally:
        for proc, temp_dir in started:
            ray_nodes.stop_node(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)
        monkeypatch.undo()


def _write_csv(tmp_path: Path) -> tuple[Path, Path]:
    """30 users with 6..12 interactions each over 20 items; deterministic, no duplicates."""
    rows = ["user_id,item_id,timestamp"]
    for u in range(N_USERS):
        for t in range(6 + u % 7):
            rows.append(f"u{u},i{(3 * u + t) % N_ITEMS},{1_000_000 + 60 * t + u}")
    inter = tmp_path / "inter.csv"
    inter.write_text("\n".join(rows) + "\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{i},Movie {i}\n" for i in range(N_ITEMS)))
    return inter, items


def _submit(client, **kw) -> str:
    """``submit_job``, retried while the head has no job agent yet (the job API answers first)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            return client.submit_job(**kw)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _wait(client, job_id: str, timeout_s: float = 300.0):
    status, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} not finished after {timeout_s:.0f} s (last {status}):\n"
                f"{client.get_job_logs(job_id)[-4000:]}")


def test_ray_job_submit_prepare(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client, _, _ = ray_head
    inter, items = _write_csv(tmp_path)
    out, out_fail = tmp_path / "out", tmp_path / "out_fail"
    runtime_env = RUNTIME_ENV

    def prepare(path: Path, out_dir: Path) -> str:
        return (f"{shlex.quote(sys.executable)} jobs/prepare.py --set data.dataset=csv"
                f" --set data.path={path} --set data.items_path={items}"
                f" --set data.output_dir={out_dir} --set data.min_item_interactions=1")

    ok = _submit(client, entrypoint=prepare(inter, out), runtime_env=runtime_env)
    bad = _submit(client, entrypoint=prepare(tmp_path / "missing.csv", out_fail), runtime_env=runtime_env)

    status, logs = _wait(client, ok), client.get_job_logs(ok)
    assert status == JobStatus.SUCCEEDED, f"prepare job ended {status}:\n{logs[-4000:]}"
    manifests = sorted(out.glob("csv-*/manifest.json"))
    assert len(manifests) == 1, f"expected one manifest under {out}, found {manifests}\n{logs[-2000:]}"
    manifest = json.loads(manifests[0].read_text())
    assert manifest["num_users"] == N_USERS
    assert manifest["num_items"] == N_ITEMS
    assert "streamed" in logs and "prepared" in logs, logs[-4000:]
    # The driver's ray.init() joined this head (a driver registered for the job), not a new Ray.
    assert client.get_job_info(ok).driver_info is not None

    status, logs = _wait(client, bad), client.get_job_logs(bad)
    assert status == JobStatus.FAILED, f"missing-file job ended {status}:\n{logs[-4000:]}"
    assert "file not found" in logs, logs[-4000:]
    assert "failed with exit code 2" in (client.get_job_info(bad).message or "")
    assert "Traceback" not in logs, logs[-4000:]  # one clear line, not a stack trace
    assert not list(out_fail.glob("*/manifest.json"))


def test_ray_job_submit_train(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client, _, _ = ray_head
    inter, items = _write_csv(tmp_path)
    config = write_tiny_config(tmp_path / "tiny.yaml", inter, items, tmp_path, str(tmp_path / "runs"))
    out = tmp_path / "train.json"
    job = _submit(client, entrypoint=f"{shlex.quote(sys.executable)} jobs/train.py --config {config} --output {out}",
                  runtime_env=RUNTIME_ENV)

    status, logs = _wait(client, job, timeout_s=600), client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"train job ended {status}:\n{logs[-4000:]}"
    assert "Started a local Ray instance" not in logs  # the driver joined this head
    progress = [line for line in logs.splitlines() if "[train] step" in line or "[eval] epoch" in line]
    assert progress and len(progress) == len(set(progress)), progress  # each worker line once
    record = json.loads(out.read_text())
    assert record["variant"] == "idle" and record["epochs"] == 1 and record["steps"] > 0
    assert record["test"]["users"] == N_USERS and 0 <= record["test"]["full"]["ndcg@10"] <= 1
    assert (tmp_path / "sasrec" / "model.json").is_file()  # the ID model the job pre-trained first
    ckpt = Path(record["checkpoint"])
    assert ckpt.parent == tmp_path / "runs" / record["run"]
    assert (ckpt / "best_trainable.safetensors").is_file()
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == record["steps"]
    assert list((tmp_path / "runs" / record["run"] / "tensorboard").glob("events.*"))


README_SUBMIT = '.venv/bin/ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/prepare.py'


def test_readme_job_submit_command_verbatim(ray_head):
    """The README's `ray job submit` line for a local head, typed into a shell in the repository as a
    new user would (the venv's `ray` on PATH, RAY_ADDRESS naming the head): the job SUCCEEDS."""
    _, address, _ = ray_head
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()
             if line.strip().startswith(README_SUBMIT)]
    assert lines, f"README no longer shows `{README_SUBMIT} ...`: update this test with it"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled",
               PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    r = subprocess.run(["bash", "-c", lines[0]], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "prepared" in out and "not found" not in out, out[-4000:]


def test_head_listens_on_loopback_only(ray_head):
    """Run after the jobs above, so their workers' and drivers' servers are counted too while alive."""
    _, _, proc = ray_head
    procs = ray_nodes.owned(proc)
    assert len(procs) > 3  # gcs_server, raylet, dashboard, ... really found
    assert ray_nodes.open_listeners(procs) == []
