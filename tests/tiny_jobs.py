"""Tiny inputs for end-to-end runs of the real jobs: a synthetic interaction log and an experiment YAML
that pre-trains a 16-wide SASRec and trains an IDLE adapter on the 'tiny-decoder' backbone with
2 Ray Train workers (0.5 CPU each) in a few steps."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from conftest import synthetic_interactions

ROOT = Path(__file__).resolve().parents[1]


# The tiny train job's sections (``conftest.tiny_train_job``, the determinism test): SASRec pre-trained
# on 2 Ray Train workers, 2 adapter epochs, 1 intra-op thread (recorded), validation on every user.
TINY_TRAIN_JOB = {"pretrain": {"epochs": 1, "num_workers": 2},
                  "train": {"epochs": 2, "torch_threads": 1, "eval_max_users": 0}}


def write_tiny_data(folder: Path, n_users: int = 24, n_items: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """``inter.csv`` + ``items.csv`` (titles) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_interactions(n_users=n_users, n_items=n_items, seed=seed).to_csv(folder / "inter.csv", index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                  "title": [f"Movie {i}" for i in range(n_items)]}).to_csv(folder / "items.csv", index=False)
    return folder / "inter.csv", folder / "items.csv"


def write_tiny_config(path: Path, inter: Path, items: Path, work: Path, storage_path: str, **sections) -> Path:
    """Experiment YAML at ``path``; data, ID-model artifact under ``work``; ``sections`` update the defaults
    section by section (e.g. ``train={"epochs": 2}``)."""
    cfg = {
        "name": "tiny",
        "data": {"dataset": "csv", "path": str(inter), "items_path": str(items), "output_dir": str(work / "data"),
                 "min_item_interactions": 1, "max_history": 6, "train_targets_per_user": 2},
        "id_model": {"hidden_size": 16, "num_heads": 2, "dropout": 0.1, "artifact": str(work / "sasrec")},
        "pretrain": {"epochs": 1, "batch_size": 16, "lr": 0.01, "num_workers": 1, "cpus_per_worker": 0.5},
        "llm": {"backbone": "tiny-decoder"},
        "prompt": {"max_history": 3, "max_tokens": 96},
        "adapter": {"prompt_length": 2, "projection_width": 16, "refine_bottleneck": 8},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 2, "cpus_per_worker": 0.5,
                  "storage_path": storage_path, "log_every": 2},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_tune_sets(tmp: Path, **overrides) -> list[str]:
    """``--set`` arguments that shrink the shipped tune config to the tiny data and decoder in ``tmp``
    (6 trials of up to 3 epochs, 1 Train worker each); ``overrides`` replace or add fields."""
    inter, items = write_tiny_data(tmp)
    sets = {"data.dataset": "csv", "data.path": inter, "data.items_path": items,
            "data.output_dir": tmp / "data", "data.min_item_interactions": 1, "data.max_history": 6,
            "data.train_targets_per_user": 2, "id_model.hidden_size": 16, "id_model.dropout": 0.1,
            "id_model.artifact": tmp / "sasrec", "pretrain.epochs": 2, "pretrain.batch_size": 16,
            "pretrain.lr": 0.01, "pretrain.cpus_per_worker": 0.5, "llm.backbone": "tiny-decoder",
            "prompt.max_history": 3, "prompt.max_tokens": 96, "adapter.refine_bottleneck": 8,
            "train.batch_size": 8, "train.num_workers": 1, "train.cpus_per_worker": 0.5, "train.epochs": 3,
            "train.storage_path": tmp / "runs", "train.log_every": 100, "tune.num_samples": 6,
            "tune.prompt_length": "[1,4]", "tune.projection_width": "[8,16]", "tune.lr": "[0.001,0.03]",
            "tune.random_trials": 2, **overrides}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def run_job(script: str, *args, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python jobs/<script> ARGS`` as a user runs it (embedded Ray), output captured."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_tiny(work: Path, **sections) -> tuple[Path, dict]:
    """A real ``jobs/train.py`` run on the tiny data in ``work``: (config path, its result record)."""
    import json
    inter, items = write_tiny_data(work)
    config = write_tiny_config(work / "tiny.yaml", inter, items, work, str(work / "runs"), **sections)
    r = run_job("train.py", "--config", config, "--output", work / "train.json", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return config, json.loads((work / "train.json").read_text())
