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


# Prefix samples and no dropout: the same stream and arithmetic in every run, so runs can be compared weight
# for weight; the worker killed in epoch 2 is the last rank, right after the first step checkpoint position
# of that epoch (a run without step checkpoints resumes from its epoch-1 checkpoint there).
TWO_EPOCHS = {"pretrain.epochs": 2, "pretrain.sample_mode": "prefix", "train.max_failures": 2, "id_model.dropout": 0.0}


@pytest.fixture(scope="module")
def shared_data(ray_local, tmp_path_factory):
    """One prepared dataset and run storage for the runs this module's tests share (each run's folder is
    changed by one test at most; the others read what :func:`finished` read first): ``(folder,
    prepared, steps per epoch, the step the worker is killed at)``."""
    from conftest import prepare_tiny, write_tiny_csv
    tmp = tmp_path_factory.mktemp("train_runs")
    prepared = prepare_tiny(tmp, write_tiny_csv(tmp))  # as tiny_prepared, once for the module
    spe = steps_per_epoch(prepared, tiny_cfg(tmp, prepared, **TWO_EPOCHS))
    fail = (spe // 4 + 1) * 4  # the first step checkpoint of epoch 2 (train.checkpoint_every_steps 4)
    assert spe < fail < 2 * spe, (spe, fail)
    return tmp, prepared, spe, fail


def finished(result) -> dict:
    """A run's final metrics, state and weights, read before a test changes its folder."""
    from safetensors.torch import load_file
    ckpt = Path(result.checkpoint.path)
    return {"result": result, "metrics": result.metrics, "checkpoint": ckpt,
            "state": json.loads((ckpt / "train_state.json").read_text()),
            "weights": load_file(str(ckpt / "trainable.safetensors"))}


@pytest.fixture(scope="module")
def uninterrupted(shared_data):
    """Two epochs, no failure: the reference of the step-checkpoint test; the resume test then
    continues it by name."""
    tmp, prepared, _, _ = shared_data
    return finished(run(tiny_cfg(tmp, prepared, **TWO_EPOCHS), prepared, "uninterrupted"))


@pytest.fixture(scope="module")
def crashed(shared_data):
    """Two epochs with epoch checkpoints only, the last worker process killed in epoch 2; the fallback
    test then corrupts its latest checkpoint."""
    tmp, prepared, _, fail = shared_data
    return finished(run(tiny_cfg(tmp, prepared, **TWO_EPOCHS), prepared, "crashed", fail_at_step=fail))


def test_two_workers_train_learn_and_resume_by_name(shared_data, uninterrupted):
    tmp, prepared, spe, _ = shared_data
    r1 = uninterrupted["metrics"]  # two epochs on two workers, nothing resumed
    assert r1["epoch"] == 2 and r1["step"] == 2 * spe and "resumes" not in uninterrupted["state"]
    assert r1["val_users"] == prepared.manifest["num_users"]  # exact: every user once
    # same name, more epochs: continues from epoch 2 instead of starting over
    cfg2 = tiny_cfg(tmp, prepared, **{**TWO_EPOCHS, "pretrain.epochs": 3})
    r2 = run(cfg2, prepared, "uninterrupted")
    assert r2.metrics["epoch"] == 3 and r2.metrics["step"] == 3 * spe
    state = json.loads((Path(r2.checkpoint.path) / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["resumes"] == [{"epoch": 2, "step": 2 * spe, "fallback": False}]
    # the synthetic pattern (next = previous + 1) is learnable: validation far above chance (1/30)
    assert r2.metrics["best_val_ndcg@10"] > 0.3
    # rerunning a finished run returns at once with the same state: no training step runs (the
    # next one would kill a worker: fail_at_step), no checkpoint is written or changed
    run_dir = tmp / "runs" / "uninterrupted"

    def checkpoints():
        return {p.name: (p / "train_state.json").read_bytes() for p in sorted(run_dir.glob("checkpoint_*"))
                if p.is_dir()}
    before = checkpoints()
    r3 = run(cfg2, prepared, "uninterrupted", fail_at_step=3 * spe + 1)
    assert not (run_dir / "failed_once").exists()
    assert checkpoints() == before and Path(r3.checkpoint.path).name == Path(r2.checkpoint.path).name
    assert r3.metrics["epoch"] == 3 and r3.metrics["step"] == 3 * spe


def test_worker_crash_recovers_from_checkpoint(shared_data, crashed):
    tmp, _, spe, _ = shared_data
    assert (tmp / "runs" / "crashed" / "failed_once").exists()  # the worker process really died
    assert crashed["metrics"]["epoch"] == 2 and crashed["metrics"]["step"] == 2 * spe
    assert crashed["state"]["resumes"] == [{"epoch": 1, "step": spe, "fallback": False}]
    assert [h["epoch"] for h in crashed["state"]["history"]] == [1, 2]


def test_corrupt_latest_checkpoint_falls_back(shared_data, crashed):
    tmp, prepared, spe, _ = shared_data
    latest = crashed["checkpoint"]  # epoch 2's; epoch 1's is the older one
    assert crashed["state"]["epoch"] == 2
    (latest / "train_state.json").write_text("{ not json")
    r3 = run(tiny_cfg(tmp, prepared, **{**TWO_EPOCHS, "pretrain.epochs": 3}), prepared, "crashed")
    # resumed from epoch 1 (the older checkpoint), so epochs 2 and 3 ran again
    assert r3.metrics["epoch"] == 3 and r3.metrics["step"] == 3 * spe
    state = json.loads((Path(r3.checkpoint.path) / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["resumes"] == [{"epoch": 1, "step": spe, "fallback": True}]


def test_step_checkpoints_resume_mid_epoch_without_repeating_a_step(shared_data, uninterrupted, crashed):
    """``train.checkpoint_every_steps``: a worker killed mid-epoch (right after a step checkpoint)
    resumes from that step, not from the epoch start, and ends with the same optimizer steps and
    the same weights as an uninterrupted run (a repeated or skipped step would change them), and as
    the same crash resumed from the epoch-1 checkpoint of a run without step checkpoints."""
    from safetensors.torch import load_file
    tmp, prepared, spe, fail = shared_data
    cfg = tiny_cfg(tmp, prepared, **{**TWO_EPOCHS, "train.checkpoint_every_steps": 4})
    steps = run(cfg, prepared, "steps", fail_at_step=fail)
    assert (tmp / "runs" / "steps" / "failed_once").exists()  # the worker process really died
    state = json.loads((Path(steps.checkpoint.path) / "train_state.json").read_text())
    assert state["resumes"] == [{"epoch": 1, "step": fail, "fallback": False}]
    assert steps.metrics["epoch"] == 2 and steps.metrics["step"] == 2 * spe
    assert [h["epoch"] for h in state["history"]] == [1, 2] and state["epoch_step"] == 0
    assert uninterrupted["metrics"]["step"] == steps.metrics["step"]
    a = load_file(str(Path(steps.checkpoint.path) / "trainable.safetensors"))
    b = uninterrupted["weights"]
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    c = crashed["weights"]  # resumed from epoch 1: the same result
    assert all(np.allclose(a[k].numpy(), c[k].numpy(), atol=1e-6) for k in a)
    assert crashed["state"]["resumes"] == [{"epoch": 1, "step": spe, "fallback": False}]
