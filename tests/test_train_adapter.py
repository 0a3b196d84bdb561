"""IDLE-Adapter under Ray Train + DeepSpeed ZeRO 1/2/3 (2 workers, tiny backbone): train, resume, stay frozen."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idle_ray.config import load_config


@pytest.fixture(scope="module")
def id_artifact(tmp_path_factory, ray_local):
    """The tiny data prepared and a tiny SASRec artifact for it, randomly initialised (saved as pre-training
    exports one): what these tests check is the adapter's training under ZeRO, not the ID model's; the
    pretrain path runs in tests/test_train.py and in every job test."""
    from conftest import synthetic_interactions
    from idle_ray.data.prepare import prepare_dataset
    from idle_ray.models.artifact import save_id_artifact
    from idle_ray.train import builders
    tmp = tmp_path_factory.mktemp("adapter")
    df = synthetic_interactions(n_users=24)
    df.to_csv(tmp / "inter.csv", index=False)
    import pandas as pd
    pd.DataFrame({"item_id": [f"i{i}" for i in range(30)], "title": [f"Movie {i}" for i in range(30)]}).to_csv(
        tmp / "items.csv", index=False)
    prepared = prepare_dataset("csv", tmp / "prepared", path=str(tmp / "inter.csv"), items_path=str(tmp / "items.csv"),
                               min_user_interactions=5, min_item_interactions=1, rows_per_shard=7, log=lambda *a: None)
    cfg = adapter_cfg(tmp)
    task, kwargs = builders.build_pretrain_task(cfg, prepared)
    artifact = str(builders.id_artifact_dir(cfg, prepared))
    save_id_artifact(task.model, artifact, name=cfg.id_model.name, kwargs=kwargs,
                     vocab_fingerprint=prepared.manifest["vocab_fingerprint"], data_fingerprint=prepared.fingerprint)
    return tmp, prepared, artifact


def adapter_cfg(tmp, **over):
    sets = {"name": "a", "data.dataset": "csv", "data.path": "unused.csv", "data.max_history": 6,
            "data.train_targets_per_user": 2, "id_model.hidden_size": 16, "id_model.dropout": 0.1,
            "pretrain.batch_size": 16, "pretrain.lr": 0.01, "pretrain.num_workers": 1,
            "pretrain.cpus_per_worker": 0.5, "llm.backbone": "tiny-decoder", "prompt.max_history": 3,
            "prompt.max_tokens": 96, "adapter.prompt_length": 2, "adapter.projection_width": 16,
            "adapter.refine_bottleneck": 8, "train.epochs": 1, "train.batch_size": 8, "train.num_workers": 2,
            "train.cpus_per_worker": 0.5, "train.storage_path": str(tmp / "runs"), "train.log_every": 2,
            "id_model.artifact": str(tmp / "sasrec")}
    sets.update(over)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


# ZeRO-1 (~2 min) is slow: between ZeRO-2 (the default) and ZeRO-3 (every parameter partitioned), both kept
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_zero_stage_trains_and_resumes(id_artifact, stage):
    from idle_ray.adapter.trainable import is_trainable
    from idle_ray.train.launch import run_training
    tmp, prepared, artifact = id_artifact
    name = f"zero{stage}"
    r1 = run_training(adapter_cfg(tmp, **{"train.zero_stage": stage}), prepared, task="adapter", run_name=name,
                      id_artifact=artifact)
    assert r1.error is None and r1.metrics["epoch"] == 1
    w1 = load_file(str(Path(r1.checkpoint.path) / "trainable.safetensors"))
    assert w1 and all(is_trainable(k) for k in w1)  # the checkpoint holds the adapter only
    assert not any(k.startswith(("llm.", "id_model.")) for k in w1)
    # score fusion: validated before the first update (the ID model's ranking), then selected on validation
    s1 = json.loads((Path(r1.checkpoint.path) / "train_state.json").read_text())
    assert s1["start"]["step"] == 0 and s1["start"]["val_users"] == prepared.manifest["num_users"]
    assert [h["epoch"] for h in s1["history"]] == [1] and s1["best_step"] in (0, r1.metrics["step"])
    r2 = run_training(adapter_cfg(tmp, **{"train.zero_stage": stage, "train.epochs": 2}), prepared, task="adapter",
                      run_name=name, id_artifact=artifact)
    assert r2.error is None and r2.metrics["epoch"] == 2 and r2.metrics["step"] == 2 * r1.metrics["step"]
    state = json.loads((Path(r2.checkpoint.path) / "train_state.json").read_text())
    assert state["resumes"] == [{"epoch": 1, "step": r1.metrics["step"], "fallback": False}]
    w2 = load_file(str(Path(r2.checkpoint.path) / "trainable.safetensors"))
    assert w2.keys() == w1.keys()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # training went on from the checkpoint
    assert "val_ndcg@10" in r2.metrics and r2.metrics["val_users"] == prepared.manifest["num_users"]
