"""`ray job submit` against a real local Ray head, end to end.

What this proves: the documented cluster path (``ray job submit --working-dir . -- python
jobs/prepare.py ...``) works, not just the embedded ``ray.init()`` path the other tests use.
The test starts its own ``ray start --head --block`` subprocess (own ports, own temp dir, own
process group), submits ``jobs/prepare.py`` through ``JobSubmissionClient`` with the repository
uploaded as the runtime-env ``working_dir`` (virtualenvs and data folders excluded), and checks
that

* the job SUCCEEDS, the driver runs on this test's Python, connects to the head (not to a new
  embedded Ray), writes ``<out>/csv-*/manifest.json`` with the right user count, and logs the
  Ray Data streaming check ("streamed") and the result ("prepared");
* a job pointing at a missing file ends FAILED with the one-line "file not found" error.

The head is stopped through its own process group in the fixture teardown (never ``ray stop``),
and the test never calls ``ray.init()``, so other Ray instances on the machine are untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".venv-recbole", "data_cache", "runs", "artifacts", "results", ".git"]
N_USERS = 30
N_ITEMS = 20


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (all sockets held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal still exists
        return True
    return True


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the head's whole process group, SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session=True: the head is its own group leader
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A throw-away local Ray head owned by this test; yields ``(JobSubmissionClient, head_env)``."""
    from ray.job_submission import JobSubmissionClient

    # Token authentication is disabled for this throw-away head only: it listens on free local
    # ports, lives for one test and is killed in the teardown. Real clusters keep token auth
    # (README "Ray, authentication and local runs", docs/cluster.md). Both sides need the setting:
    # the head (and hence its job drivers) and the submitting client.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    # Ray puts Unix sockets under the temp dir (<temp>/session_<date>_<pid>/sockets/...), and
    # socket paths are limited to ~107 bytes, so pytest's tmp_path is too deep: use a short
    # unique /tmp folder owned (and removed) by this test. It also keeps this head's
    # ray_current_cluster file and session_latest link away from /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)

    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    env.update({
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else shutil.which("ray") or "ray",
           "start", "--head", "--block",
           f"--port={gcs_port}", f"--dashboard-port={dash_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
           f"--object-store-memory={256 * 1024 ** 2}", f"--temp-dir={temp_dir}"]
    head_log = tmp_path / "head.log"
    log_f = open(head_log, "wb")
    proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash_port}"
        client, last_err = None, None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}:\n{_tail(head_log)}")
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()  # the job API answers, not only /api/version
                break
            except Exception as e:  # noqa: BLE001 - dashboard still starting
                client, last_err = None, e
                time.sleep(1)
        if client is None:
            pytest.fail(f"job API at {address} did not answer in 90 s ({last_err!r}):\n{_tail(head_log)}")
        yield client, env, address
    finally:
        _stop_group(proc)
        log_f.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def _wait(client, job_id: str, timeout_s: float = 300.0):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} not finished after {timeout_s:.0f} s (last {status}):\n"
                f"{client.get_job_logs(job_id)[-4000:]}")
    return JobStatus.STOPPED


def test_ray_job_submit_prepare(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client, env, _ = ray_head
    inter, items = _write_csv(tmp_path)
    out, out_fail = tmp_path / "out", tmp_path / "out_fail"
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": EXCLUDES,
        "env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                     "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    }

    def prepare(path: Path, out_dir: Path) -> str:
        return (f"{shlex.quote(sys.executable)} jobs/prepare.py --set data.dataset=csv"
                f" --set data.path={path} --set data.items_path={items}"
                f" --set data.output_dir={out_dir} --set data.min_item_interactions=1")

    ok = client.submit_job(entrypoint=prepare(inter, out), runtime_env=runtime_env)
    bad = client.submit_job(entrypoint=prepare(tmp_path / "missing.csv", out_fail), runtime_env=runtime_env)

    status, logs = _wait(client, ok), client.get_job_logs(ok)
    assert status == JobStatus.SUCCEEDED, f"prepare job ended {status}:\n{logs[-4000:]}"
    manifests = sorted(out.glob("csv-*/manifest.json"))
    assert len(manifests) == 1, f"expected one manifest under {out}, found {manifests}\n{logs[-2000:]}"
    manifest = json.loads(manifests[0].read_text())
    assert manifest["num_users"] == N_USERS
    assert manifest["num_items"] == N_ITEMS
    assert "streamed" in logs and "prepared" in logs, logs[-4000:]

    status, logs = _wait(client, bad), client.get_job_logs(bad)
    assert status == JobStatus.FAILED, f"missing-file job ended {status}:\n{logs[-4000:]}"
    assert "file not found" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]  # one clear line, not a stack trace
    assert not list(out_fail.glob("*/manifest.json"))
