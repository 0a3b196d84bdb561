"""Driver side of training: datasets + ``TorchTrainer`` + run/failure/checkpoint configs.

A run is identified by ``(train.storage_path, name)``: launching the same name again resumes
from its latest checkpoint (Ray Train restores the run; the worker loads the checkpoint), and a
finished run returns at once with its final state.
"""
from __future__ import annotations

import os

import ray

from idle_ray.config import ConfigError, ExperimentConfig, to_dict
from idle_ray.data.feed import Windowing
from idle_ray.data.pipeline import sequence_dataset, split_dataset
from idle_ray.data.prepare import PreparedDataset
from idle_ray.train import builders
from idle_ray.train import storage as run_storage
from idle_ray.train.checkpoints import CKPT_META, CKPT_WEIGHTS
from idle_ray.train.manifests import require_complete
from idle_ray.train.cluster import ensure_ray, require_shared_paths  # noqa: F401 - ensure_ray: this API
from idle_ray.train.worker import train_fn_per_worker


def ingest_options():
    """Ray Data options of the training ingest: Train's defaults plus order preservation (the seeded
    shuffle then gives the same stream every run)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def check_storage(storage_path: str, num_workers: int, cpus_per_worker: float = 0.0, use_gpu: bool = False) -> str:
    """Local folders are made absolute (whether other nodes see them is
    :func:`~idle_ray.train.cluster.require_shared_paths`' call); a URI (``s3://``, ``gs://``) must be
    writable now (:func:`idle_ray.train.storage.check_uri`), from the driver and, with Ray up, from a
    node where a Train worker (``cpus_per_worker``, ``use_gpu``) runs."""
    if run_storage.is_uri(storage_path):
        run_storage.check_uri(storage_path)
        if ray.is_initialized():  # every launch starts Ray first; a config-time check without it is the driver's
            check_uri_on_worker(storage_path, cpus_per_worker, use_gpu)
        return storage_path
    return run_storage.absolute(storage_path)


def _write_probe(storage_path: str) -> tuple[str, str]:
    """(this node's address, the write check's error or ""): runs as a task beside the Train workers."""
    node = ray.util.get_node_ip_address()
    try:
        run_storage.check_uri(storage_path, where=f" from node {node}, where Train workers run (the driver could)")
    except ConfigError as e:
        return node, str(e)
    return node, ""


def check_uri_on_worker(storage_path: str, cpus_per_worker: float, use_gpu: bool) -> None:
    """The write check as a Ray task asking what one Train worker asks, so it lands where workers run:
    workers upload their checkpoint shards with their node's credentials (instance profile, service
    account), which may differ from the driver's (the head's). Nodes of one type share an identity,
    so one probe stands for them. Raises ``ConfigError`` naming the node and the fix."""
    probe = ray.remote(_write_probe).options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=0)
    _, error = ray.get(probe.remote(storage_path))
    if error:
        raise ConfigError(error)


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
    require_shared_paths(cfg)
    storage = check_storage(cfg.train.storage_path, workers, cpus, cfg.train.use_gpu and not pre)
    if not pre:
        builders.prepare_backbone(cfg)
    stage = None if pre or cfg.adapter.variant == "id_only" else (encode_prompts, prompt_stage_kwargs(cfg, prepared))
    d = cfg.data
    # One training dataset per rank (users with user % world == rank), globally shuffled with a seed
    # and read in order: the same samples reach the same rank in the same order in every run.
    windows = pre and cfg.pretrain.sample_mode == "window"
    targets, holdout = builders.train_selection(cfg, pre)
    feeds = {}
    if stage is None:
        # Ray Data moves the user sequences; each worker windows its share (idle_ray.data.feed):
        # a fraction of the data and tasks of windowing in Ray (README, "Data pipeline benchmark").
        feeds["train"] = Windowing("train", d.max_history, targets, windows, holdout, world=workers,
                                   shuffle_samples=d.shuffle_samples)
        datasets = {f"train_{rank}": sequence_dataset(prepared) for rank in range(workers)}
    else:
        # Prompt tokenisation (the costly part) stays in Ray Data tasks, off the training loop.
        datasets = {f"train_{rank}": split_dataset(
            prepared, "train", d.max_history, targets, extra_stage=stage,
            windows=windows, seed=cfg.seed, holdout=holdout, rank=rank,
            world=workers) for rank in range(workers)}
    datasets["valid"] = split_dataset(prepared, "valid", d.max_history, extra_stage=stage)
    run_dir = run_storage.join(storage, run_name)  # a folder or a URI: the worker reads both
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // workers)
    loop_config = {"experiment": to_dict(cfg), "task": task, "prepared": str(prepared.path),
                   "id_artifact": str(id_artifact) if id_artifact else None, "run_dir": run_dir,
                   "fail_at_step": fail_at_step, "feeds": feeds,
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
    latest checkpoint; :class:`~idle_ray.train.manifests.IncompleteCheckpoint` when that checkpoint
    lacks a rank's files."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("the run produced no checkpoint")
    require_complete(ckpt.filesystem, ckpt.path)  # every rank's files, before anything is evaluated
    path = run_storage.join(run_storage.uri(ckpt.filesystem, ckpt.path), "best_" + CKPT_WEIGHTS)
    if not run_storage.exists(path):
        raise RuntimeError(f"{ckpt.path}: no best weights ({CKPT_META} may be from an older version)")
    return path
