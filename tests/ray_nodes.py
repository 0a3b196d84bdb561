"""Throw-away Ray nodes for tests: ``ray start --block`` processes on loopback, free ports and a private
temp dir, each in its own session, stopped through their own handles (never ``ray stop``, which would
stop every Ray on the machine, other people's included).

Every node binds 127.0.0.1 only (``--node-ip-address`` and the dashboard host); :func:`open_listeners`
lists any socket a node's processes opened on another address, so a test can prove it. More nodes
join through Ray's fake multi-node autoscaler (:func:`fake_cluster_config`): ``ray start --address``
refuses to join a head on 127.0.0.1 under the loopback rule above.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from idle_ray.train.cluster import torch_extensions_dir

LOOPBACK = "127.0.0.1"
# What a head, and a driver that joins it, get in their environment: no auth for a throw-away head on
# loopback, nothing to drain on stop (see stop_node), no telemetry, unbuffered logs; and "this
# machine" is 127.0.0.1 (Ray's macOS/Windows rule): otherwise Ray rewrites a 127.0.0.1 address to
# the machine's network address before connecting, where a loopback-only head does not listen.
HEAD_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free right now (all held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_bin() -> str:
    """This interpreter's ``ray`` (a ``.venv/bin/ray`` run without the venv activated still finds it)."""
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else shutil.which("ray") or "ray"


def short_temp_dir(prefix: str) -> str:
    """Ray puts Unix sockets under its temp dir and socket paths are limited to ~107 bytes, so pytest's
    tmp_path is too deep: a short unique /tmp folder, which the caller removes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def node_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HEAD_ENV)
    env.update(extra or {})
    # the nodes' DeepSpeed CPU op builds into this venv's cache, as an embedded Ray's workers' do
    # (the default ~/.cache/torch_extensions would be a second multi-minute build on 2 cores)
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    return env


def start_head(log_path: Path, temp_dir: str, *, num_cpus: float = 2, args: tuple = (), env: dict | None = None,
               gcs_port: int | None = None):
    """``ray start --head --block`` on loopback; returns ``(proc, gcs_address, dashboard_url)``.

    Every listening port is chosen here (``gcs_port`` when the caller needs it beforehand): the
    defaults (6379, 8265, 10001, 52365) may belong to another Ray on this machine. The remaining
    ports are picked by the OS."""
    picked, dash_port, client_port, agent_port = free_ports(4)
    gcs_port = gcs_port or picked
    cmd = [ray_bin(), "start", "--head", "--block",
           f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}",
           f"--port={gcs_port}", f"--dashboard-port={dash_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
           f"--object-store-memory={256 * 1024 ** 2}", f"--temp-dir={temp_dir}", *args]
    # Ray Train's placement-group cleaner finds the state API by auto-detection, which fails when
    # several Ray instances share the machine: name this head's (every node inherits it).
    api = {"RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{dash_port}"}
    proc = _spawn(cmd, log_path, node_env({**api, **(env or {})}), temp_dir)
    return proc, f"{LOOPBACK}:{gcs_port}", f"http://{LOOPBACK}:{dash_port}"


def _spawn(cmd: list, log_path: Path, env: dict, cwd) -> subprocess.Popen:
    with open(log_path, "wb") as log_f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def wait_started(proc: subprocess.Popen, log_path: Path, timeout_s: float = 90.0) -> bool:
    """True once ``ray start`` printed that the node runs; False if it died or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if "Ray runtime started" in tail(log_path, 100_000):
            return True
        time.sleep(1)
    return False


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def alive(procs) -> list:
    """The processes of ``procs`` that still run (zombies waiting to be reaped count as gone)."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def owned(proc: subprocess.Popen) -> list:
    """The node's process and everything it started: its process group plus all descendants.

    Ray workers (``ray::IDLE``, job drivers) call setsid and leave the node's process group, so
    killing the group alone would miss them; they are found through the parent links instead.
    """
    import psutil

    procs = {}
    if proc.poll() is None:  # not reaped yet, so proc.pid cannot belong to another process
        try:
            leader = psutil.Process(proc.pid)
            procs[leader.pid] = leader
            for c in leader.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
    # The group id stays reserved while any member lives, even after the leader was reaped.
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == proc.pid:
                procs.setdefault(p.pid, p)
        except (OSError, psutil.Error):
            pass
    return list(procs.values())


def open_listeners(procs) -> list[str]:
    """``"name pid address:port"`` for every listening TCP socket of ``procs`` not bound to loopback."""
    import psutil

    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not _loopback(c.laddr.ip):
                out.append(f"{name} {p.pid} {c.laddr.ip}:{c.laddr.port}")
    return out


def _loopback(ip: str) -> bool:
    """127.0.0.1, ::1, or 127.0.0.1 as a dual-stack socket shows it (::ffff:127.0.0.1)."""
    import ipaddress
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def stop_node(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a node by its own handle: SIGTERM its process group, SIGKILL what is left after 30 s.

    Nodes run with ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``: otherwise ``ray start --block``
    answers SIGTERM by asking the GCS to drain the node, the GCS (same group) is already gone, and
    the RPC waits out its 30 s timeout, so every teardown would end in SIGKILL.
    """
    procs = owned(proc)  # before the signal: workers are found through their parents
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session=True: the node leads its group
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not alive(procs + owned(proc)):
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in alive(procs):
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def fake_cluster_config(gcs_address: str, max_workers: int, worker_cpus: float = 1) -> dict:
    """An autoscaler config for Ray's fake multi-node provider (the one ``ray.cluster_utils.AutoscalingCluster``
    drives; its template's fields): a 0-CPU head and 0..``max_workers`` workers of ``worker_cpus``, each
    a real raylet on this machine, started by the head's autoscaler for pending work."""
    return {
        "cluster_name": "idle-ray-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,  # no node leaves while a test runs
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": worker_cpus, "object_store_memory": 128 * 1024 ** 2},
                           "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def start_autoscaling_head(log_path: Path, temp_dir: str, *, max_workers: int, worker_cpus: float = 1,
                           env: dict | None = None):
    """A 0-CPU head whose autoscaler adds fake worker nodes (0 at the start); ``(proc, gcs, dashboard)``.

    Not ``AutoscalingCluster.start()``: it runs ``ray stop --force`` (every Ray on the machine, other
    people's included) and reads a template YAML the Ray wheel does not ship. The worker nodes inherit
    the head's environment (``env``: e.g. ``PYTHONPATH`` so their workers import idle_ray)."""
    (gcs_port,) = free_ports(1)
    gcs = f"{LOOPBACK}:{gcs_port}"
    config = Path(temp_dir) / "autoscaler.json"
    config.write_text(json.dumps(fake_cluster_config(gcs, max_workers, worker_cpus)))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}
    return start_head(log_path, temp_dir, num_cpus=0, gcs_port=gcs_port, env=env,
                      args=(f"--autoscaling-config={config}",))


def repo_pythonpath() -> str:
    """PYTHONPATH with the repository first: workers started by a ``ray start`` node import idle_ray."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
