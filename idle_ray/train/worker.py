"""The worker function shared by pre-training, adapter training and Tune trials (house rule 5).

``train_fn_per_worker(config)`` runs on every Ray Train worker: it builds the task (an ID model
for pre-training, or frozen LLM + frozen ID model + adapter), wraps the trainable parameters in
a DeepSpeed engine, streams batches from ``ray.train.get_dataset_shard("train")``, evaluates on
validation every epoch (each worker scores its share of users; sums are all-reduced, so the
metrics are exact), and checkpoints the trainable part + optimiser/scheduler/step state through
``ray.train.report``; it resumes from ``ray.train.get_checkpoint()``.

``run_standalone(config)`` runs the same loop without Ray (world size 1) on the local Parquet
shards, for profiling on one GPU or debugging.

``config`` (plain, picklable): ``experiment`` (the ExperimentConfig as a dict), ``task``
("pretrain" | "adapter"), ``prepared`` (prepared dataset folder), ``id_artifact`` (adapter
task), ``run_dir`` (the run's folder or URI under ``train.storage_path``: TensorBoard logs,
older checkpoints to fall back to), optional ``fail_at_step`` (fault tests), optional ``feeds``
(``{split: Windowing}``: datasets of user sequences the worker windows, see ``contexts.RayContext``).

The pieces: ``loop`` (the training loop), ``contexts`` (Ray Train or local data and reports),
``steps`` (device, engine, one step), ``validation`` (metrics in the workers), ``checkpoints``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from idle_ray.config import ExperimentConfig, experiment_from_dict
from idle_ray.data.prepare import load_prepared
from idle_ray.train.contexts import LocalContext, RayContext
from idle_ray.train.loop import train_loop


def _build_task(config: dict, cfg: ExperimentConfig, prepared):
    from idle_ray.train import builders
    if config["task"] == "pretrain":
        model, _ = builders.build_pretrain_task(cfg, prepared)
        return model
    return builders.build_adapter_task(cfg, prepared, config["id_artifact"])


def train_fn_per_worker(config: dict) -> dict:
    """Ray Train entry point (see module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = experiment_from_dict(config["experiment"])
    prepared = load_prepared(config["prepared"])
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    model = _build_task(config, cfg, prepared)
    return train_loop(config, RayContext(config.get("feeds")), cfg, prepared, model)


def local_stage(task: str, cfg: ExperimentConfig, prepared):
    """The per-batch stage the Ray Data pipeline applies (prompt tokenisation for adapters), as a
    plain function for :class:`LocalContext`; ``None`` for pre-training."""
    if task != "adapter":
        return None
    from idle_ray.train.builders import encode_prompts, prompt_stage_kwargs
    kwargs = prompt_stage_kwargs(cfg, prepared)
    return lambda batch: encode_prompts(batch, **kwargs)


def run_standalone(config: dict) -> dict:
    """The same loop without Ray: world size 1, local shards, checkpoints under ``run_dir``."""
    from idle_ray.train.engine import init_single_process_group
    init_single_process_group()
    cfg = experiment_from_dict(config["experiment"])
    prepared = load_prepared(config["prepared"])
    model = _build_task(config, cfg, prepared)
    stage = local_stage(config["task"], cfg, prepared)
    out = Path(config.get("run_dir") or tempfile.mkdtemp(prefix="idle_ray_standalone_"))
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "run_dir": str(out)}
    pretrain = config["task"] == "pretrain"
    windows = pretrain and cfg.pretrain.sample_mode == "window"
    from idle_ray.train.builders import train_selection
    targets, holdout = train_selection(cfg, pretrain)
    return train_loop(config, LocalContext(prepared, cfg, stage, out, windows, holdout, targets), cfg, prepared, model)
