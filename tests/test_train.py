"""Ray Train + DeepSpeed: training, resume by name, worker crash recovery, checkpoint fallback."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from idle_ray.config import load_config


def tiny_cfg(tmp_path, prepared, **over):
    sets = {"name": "t", "data.dataset": "csv", "data.path": "unused.csv", "data.max_history": 8,
            "id_model.hidden_size": 16, "id_model.num_heads": 2, "id_model.dropout": 0.1,
            "pretrain.epochs": 2, "pretrain.batch_size": 16, "pretrain.lr": 0.01, "pretrain.num_workers": 2,
            "pretrain.cpus_per_worker": 0.5, "train.storage_path": str(tmp_path / "runs"), "train.log_every": 5}
    sets.update(over)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def run(cfg, prepared, name, **kw):
    from idle_ray.train.launch import run_training
    result = run_training(cfg, prepared, task="pretrain", run_name=name, **kw)
    assert result.error is None
    return result


def steps_per_epoch(prepared, cfg):
    import math

    from idle_ray.data.pipeline import sample_count
    per_worker = cfg.pretrain.batch_size // cfg.pretrain.num_workers
    samples = sample_count(prepared, "train", cfg.data.max_history, windows=cfg.pretrain.sample_mode == "window")
    return math.ceil(samples / (per_worker * cfg.pretrain.num_workers))


def test_two_workers_train_learn_and_resume_by_name(ray_local, tiny_prepared, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_prepared, **{"pretrain.epochs": 1})
    r1 = run(cfg, tiny_prepared, "resume")
    spe = steps_per_epoch(tiny_prepared, cfg)
    assert r1.metrics["epoch"] == 1 and r1.metrics["step"] == spe
    assert r1.metrics["val_users"] == tiny_prepared.manifest["num_users"]  # exact: every user once
    # same name, more epochs: continues from epoch 1 instead of starting over
    cfg2 = tiny_cfg(tmp_path, tiny_prepared, **{"pretrain.epochs": 3})
    r2 = run(cfg2, tiny_prepared, "resume")
    assert r2.metrics["epoch"] == 3 and r2.metrics["step"] == 3 * spe
    state = json.loads((Path(r2.checkpoint.path) / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["resumes"] == [{"epoch": 1, "step": spe, "fallback": False}]
    # the synthetic pattern (next = previous + 1) is learnable: validation far above chance (1/30)
    assert r2.metrics["best_val_ndcg@10"] > 0.3
    # rerunning a finished run returns at once with the same state: no training step runs (the
    # next one would kill a worker: fail_at_step), no checkpoint is written or changed
    run_dir = tmp_path / "runs" / "resume"

    def checkpoints():
        return {p.name: (p / "train_state.json").read_bytes() for p in sorted(run_dir.glob("checkpoint_*"))
                if p.is_dir()}
    before = checkpoints()
    r3 = run(cfg2, tiny_prepared, "resume", fail_at_step=3 * spe + 1)
    assert not (run_dir / "failed_once").exists()
    assert checkpoints() == before and Path(r3.checkpoint.path).name == Path(r2.checkpoint.path).name
    assert r3.metrics["epoch"] == 3 and r3.metrics["step"] == 3 * spe


def test_worker_crash_recovers_from_checkpoint(ray_local, tiny_prepared, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_prepared, **{"pretrain.epochs": 2, "train.max_failures": 2})
    spe = steps_per_epoch(tiny_prepared, cfg)
    result = run(cfg, tiny_prepared, "crash", fail_at_step=spe + 1)  # mid-epoch 2, after checkpoint 1
    assert (tmp_path / "runs" / "crash" / "failed_once").exists()  # the worker process really died
    assert result.metrics["epoch"] == 2 and result.metrics["step"] == 2 * spe
    state = json.loads((Path(result.checkpoint.path) / "train_state.json").read_text())
    assert state["resumes"] == [{"epoch": 1, "step": spe, "fallback": False}]


def test_corrupt_latest_checkpoint_falls_back(ray_local, tiny_prepared, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_prepared, **{"pretrain.epochs": 2})
    r = run(cfg, tiny_prepared, "corrupt")
    latest = Path(r.checkpoint.path)
    (latest / "train_state.json").write_text("{ not json")
    cfg3 = tiny_cfg(tmp_path, tiny_prepared, **{"pretrain.epochs": 3})
    r3 = run(cfg3, tiny_prepared, "corrupt")
    spe = steps_per_epoch(tiny_prepared, cfg)
    # resumed from epoch 1 (the older checkpoint), so epochs 2 and 3 ran again
    assert r3.metrics["epoch"] == 3 and r3.metrics["step"] == 3 * spe
    state = json.loads((Path(r3.checkpoint.path) / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["resumes"] == [{"epoch": 1, "step": spe, "fallback": True}]


def test_step_checkpoints_resume_mid_epoch_without_repeating_a_step(ray_local, tiny_prepared, tmp_path):
    """``train.checkpoint_every_steps``: a worker killed mid-epoch (right after a step checkpoint)
    resumes from that step, not from the epoch start, and ends with the same optimizer steps and
    the same weights as an uninterrupted run (a repeated or skipped step would change them)."""
    from safetensors.torch import load_file
    over = {"pretrain.epochs": 2, "pretrain.sample_mode": "prefix", "train.max_failures": 2,
            "train.checkpoint_every_steps": 4, "id_model.dropout": 0.0}
    cfg = tiny_cfg(tmp_path, tiny_prepared, **over)
    spe = steps_per_epoch(tiny_prepared, cfg)
    fail = (spe // 4 + 1) * 4  # the first step checkpoint of epoch 2
    assert spe < fail < 2 * spe, (spe, fail)
    crashed = run(cfg, tiny_prepared, "steps", fail_at_step=fail)
    assert (tmp_path / "runs" / "steps" / "failed_once").exists()  # the worker process really died
    state = json.loads((Path(crashed.checkpoint.path) / "train_state.json").read_text())
    assert state["resumes"] == [{"epoch": 1, "step": fail, "fallback": False}]
    assert crashed.metrics["epoch"] == 2 and crashed.metrics["step"] == 2 * spe
    assert [h["epoch"] for h in state["history"]] == [1, 2] and state["epoch_step"] == 0
    ref = run(tiny_cfg(tmp_path, tiny_prepared, **over), tiny_prepared, "steps_ref")
    assert ref.metrics["step"] == crashed.metrics["step"]
    a = load_file(str(Path(crashed.checkpoint.path) / "trainable.safetensors"))
    b = load_file(str(Path(ref.checkpoint.path) / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    without = tiny_cfg(tmp_path, tiny_prepared, **{**over, "train.checkpoint_every_steps": 0})
    other = run(without, tiny_prepared, "epochs_only", fail_at_step=fail)  # resumes from epoch 1: same result
    c = load_file(str(Path(other.checkpoint.path) / "trainable.safetensors"))
    assert all(np.allclose(a[k].numpy(), c[k].numpy(), atol=1e-6) for k in a)
    assert json.loads((Path(other.checkpoint.path) / "train_state.json").read_text())["resumes"] == [
        {"epoch": 1, "step": spe, "fallback": False}]
