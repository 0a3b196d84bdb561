"""Driver side of training: datasets + ``TorchTrainer`` + run/failure/checkpoint configs.

A run is identified by ``(train.storage_path, name)``: launching the same name again resumes
from its latest checkpoint (Ray Train restores the run; the worker loads the checkpoint), and a
finished run returns at once with its final state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ray

from idle_ray.config import ConfigError, ExperimentConfig, to_dict
from idle_ray.data.pipeline import split_dataset
from idle_ray.data.prepare import PreparedDataset
from idle_ray.train import builders
from idle_ray.train import storage as run_storage
from idle_ray.train.checkpoints import CKPT_META, CKPT_WEIGHTS
from idle_ray.train.worker import train_fn_per_worker


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join a running cluster (``RAY_ADDRESS`` / ``ray job submit``) or start an embedded one."""
    if ray.is_initialized():
        return
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # Train V2 patches print() in its workers to log through the root logger *and*, when the
           # worker's stdout is wrapped (it is under `ray job submit`), to print as well: every
           # progress line reached `ray job logs` twice. Unpatched, a print is a print, once.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
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
    kwargs = {}
    if not os.environ.get("RAY_ADDRESS"):
        # The dashboard serves the state API that Ray Train's PlacementGroupCleaner uses to release
        # the resources of stopped runs (e.g. ASHA-stopped Tune trials). Its client finds the API by
        # auto-detection, which fails when several Ray instances run on one machine: name it.
        port = _free_port()
        kwargs["dashboard_port"] = port
        env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=True, runtime_env={"env_vars": env}, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False


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


def ingest_options():
    """Ray Data options of the training ingest: Train's defaults plus order preservation (the seeded
    shuffle then gives the same stream every run)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def check_storage(storage_path: str, num_workers: int) -> str:
    """Local folders are made absolute; a node-local path cannot serve a multi-node run; a URI
    (``s3://``, ``gs://``) must be writable now (:func:`idle_ray.train.storage.check_uri`)."""
    if run_storage.is_uri(storage_path):
        run_storage.check_uri(storage_path)
        return storage_path
    path = run_storage.absolute(storage_path)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and num_workers > 1 and not os.environ.get("IDLE_RAY_SHARED_STORAGE"):
        raise ConfigError(
            f"field 'train.storage_path' = {storage_path!r} is a node-local folder but the cluster has {len(nodes)} "
            "nodes: checkpoints must be on shared storage. Fix: use s3://, gs:// or an NFS mount "
            "(and set IDLE_RAY_SHARED_STORAGE=1 if the path is a shared mount).")
    return path


def run_training(cfg: ExperimentConfig, prepared: PreparedDataset, *, task: str, run_name: str,
                 id_artifact: str | None = None, fail_at_step: int | None = None,
                 extra_callbacks: list | None = None):
    """Train on Ray; returns the ``ray.train.Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from idle_ray.train.builders import encode_prompts, prompt_stage_kwargs

    pre = task == "pretrain"
    workers = cfg.pretrain.num_workers if pre else cfg.train.num_workers
    cpus = cfg.pretrain.cpus_per_worker if pre else cfg.train.cpus_per_worker
    storage = check_storage(cfg.train.storage_path, workers)
    if not pre:
        builders.prepare_backbone(cfg)
    stage = None if pre or cfg.adapter.variant == "id_only" else (encode_prompts, prompt_stage_kwargs(cfg, prepared))
    d = cfg.data
    # One training dataset per rank (users with user % world == rank), globally shuffled with a seed
    # and read in order: the same samples reach the same rank in the same order in every run.
    windows = pre and cfg.pretrain.sample_mode == "window"
    targets, holdout = builders.train_selection(cfg, pre)
    datasets = {f"train_{rank}": split_dataset(
        prepared, "train", d.max_history, targets, extra_stage=stage,
        windows=windows, seed=cfg.seed, holdout=holdout, rank=rank,
        world=workers) for rank in range(workers)}
    datasets["valid"] = split_dataset(prepared, "valid", d.max_history, extra_stage=stage)
    run_dir = run_storage.join(storage, run_name)  # a folder or a URI: the worker reads both
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // workers)
    loop_config = {"experiment": to_dict(cfg), "task": task, "prepared": str(prepared.path),
                   "id_artifact": str(id_artifact) if id_artifact else None, "run_dir": run_dir,
                   "fail_at_step": fail_at_step,
                   # intra-op threads: the config's, else the node's cores shared by its workers
                   "torch_threads": threads}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu and not pre,
                                     resources_per_worker={"CPU": cpus}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest_options()),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=extra_callbacks or None),
    )
    return trainer.fit()


def best_weights(result) -> str:
    """Location (path or URI) of the best (validation-selected) trainable weights in the run's
    latest checkpoint."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("the run produced no checkpoint")
    path = run_storage.join(run_storage.uri(ckpt.filesystem, ckpt.path), "best_" + CKPT_WEIGHTS)
    if not run_storage.exists(path):
        raise RuntimeError(f"{ckpt.path}: no best weights ({CKPT_META} may be from an older version)")
    return path
