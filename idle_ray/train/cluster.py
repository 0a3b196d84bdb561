"""Ray for a job: join the cluster or start an embedded one, and refuse, before any work, locations
that workers on other nodes could not read (house rule 15).

Workers (Ray Train ranks, Ray Data read tasks, evaluation actors, Tune trials) read the prepared data
(``data.output_dir``), the ID-model artifacts (``id_model.artifact`` or ``id_model.artifacts_dir``,
``pretrain.init_artifact``) and the run storage (``train.storage_path``). On one machine local folders
serve them all. On a cluster whose workers may run on another node than this process (more than one
node, or this node has no CPU for them, as a head with ``num-cpus: 0`` whose workers the autoscaler
starts), each must be a URI (``s3://``, ``gs://``) or a folder mounted at the same path on every node
(NFS / ReadWriteMany), declared with ``IDLE_RAY_SHARED_STORAGE=1``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ray

from idle_ray.config import ConfigError, ExperimentConfig
from idle_ray.locations import SHARED_STORAGE_ENV, is_uri


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join a running cluster (``RAY_ADDRESS`` / ``ray job submit``) or start an embedded one."""
    if ray.is_initialized():
        return
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # Train V2 patches print() in its workers to log through the root logger *and*, when the
           # worker's stdout is wrapped (it is under `ray job submit`), to print as well: every
           # progress line reached `ray job logs` twice. Unpatched, a print is a print, once.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if os.environ.get(SHARED_STORAGE_ENV):
        # the driver's declaration holds for its workers too: a Tune trial's driver runs on a worker
        # node and checks the paths again before its Train run
        env[SHARED_STORAGE_ENV] = os.environ[SHARED_STORAGE_ENV]
    # Under `ray job submit` Ray merges this runtime env into the job's and refuses any variable
    # the job's runtime env sets too (even with the same value): leave those to the job.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
    if not os.environ.get("RAY_ADDRESS"):
        # Embedded local Ray: workers start in another folder, so they need the package on their
        # path (under `ray job submit` the job's working_dir provides it).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # DeepSpeed JIT-builds a CPU op (deepspeed_shm_comm) at every engine start into torch's
        # extension cache; venvs sharing the default ~/.cache/torch_extensions rewrite each other's
        # build files and runs rebuilt it in turn (minutes of compiling on 2 cores): one cache per venv.
        env["TORCH_EXTENSIONS_DIR"] = os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
        # Train V2 starts a preemption-watcher actor per run (a process: ~2 s of CPU to start) that polls
        # for nodes being drained; the one node of an embedded Ray is never drained.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs = {}
    if not os.environ.get("RAY_ADDRESS"):
        # The dashboard serves the state API that Ray Train's PlacementGroupCleaner uses to release
        # the resources of stopped runs (e.g. ASHA-stopped Tune trials). Its client finds the API by
        # auto-detection, which fails when several Ray instances run on one machine: name it.
        port = _free_port()
        kwargs["dashboard_port"] = port
        env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=True, runtime_env={"env_vars": env}, **kwargs)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False


def torch_extensions_dir() -> str:
    """This venv's own folder for torch's JIT-built extensions (DeepSpeed's CPU ops)."""
    import hashlib
    import sys
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"venv-{key}")


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_read_locations(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """``(field, location)`` of everything the run's workers read."""
    m = cfg.id_model
    out = [("data.output_dir", cfg.data.output_dir),
           ("id_model.artifact", m.artifact) if m.artifact else ("id_model.artifacts_dir", m.artifacts_dir),
           ("train.storage_path", cfg.train.storage_path)]
    if cfg.pretrain.init_artifact:
        out.append(("pretrain.init_artifact", cfg.pretrain.init_artifact))
    return out


def workers_elsewhere() -> str | None:
    """Why this Ray's workers may run on another node than this process, or None (one node that
    holds them, e.g. the embedded Ray of a local run)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        return f"the cluster has {len(nodes)} nodes"
    here = ray.get_runtime_context().get_node_id()
    if not any(n["NodeID"] == here and n["Resources"].get("CPU", 0) > 0 for n in nodes):
        return "this node has no CPU for workers (they start on other nodes)"
    return None


def require_shared_paths(cfg: ExperimentConfig) -> None:
    """Refuse (:class:`ConfigError`: the fields, the reason, the fix) a config whose workers would read
    a folder of this node only. Joins the cluster first when ``RAY_ADDRESS`` names one; without it and
    before Ray starts, the job's Ray will be an embedded one on this machine, and nothing is refused."""
    local = [(f, v) for f, v in worker_read_locations(cfg) if not is_uri(v)]
    if not local or os.environ.get(SHARED_STORAGE_ENV):
        return
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return
        ensure_ray()
    reason = workers_elsewhere()
    if reason is None:
        return
    many = len(local) > 1
    fields = ", ".join(f"'{f}' = {v!r}" for f, v in local)
    fix = " ".join(f"--set {f}=s3://BUCKET/idle_ray/{_SUFFIX[f]}" for f, _ in local)
    raise ConfigError(f"field{'s' if many else ''} {fields} {'are folders' if many else 'is a folder'} on this node "
                      f"only, but the run's workers run on other nodes ({reason}) and could not read "
                      f"{'them' if many else 'it'}. Fix: {fix} (or gs://), or a folder mounted at the same path on "
                      f"every node with {SHARED_STORAGE_ENV}=1")


_SUFFIX = {"data.output_dir": "data", "id_model.artifacts_dir": "artifacts", "id_model.artifact": "artifacts/NAME",
           "train.storage_path": "runs", "pretrain.init_artifact": "artifacts/NAME"}
