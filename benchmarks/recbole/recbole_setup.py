"""RecBole 1.2.1's import under numpy >= 2 and the config dict of a reference run (its documented defaults)."""
from __future__ import annotations

from pathlib import Path


# ----------------------------------------------------------------------- RecBole
def numpy2_compat():
    """Let RecBole 1.2.1 import under numpy >= 2 (e.g. a GPU image whose numpy is 2.x).

    RecBole's ``Config.compatibility_settings`` aliases ``np.float = np.float_`` etc.; numpy 2
    removed ``float_``, ``complex_`` and ``unicode_``.  Restoring those three aliases (to the
    types they always named) is all it needs; nothing about the algorithm changes.  A no-op
    under numpy 1.x (``.venv-recbole``).
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
            if old not in np.__dict__:
                setattr(np, old, new)


def import_recbole():
    numpy2_compat()
    import torch
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    # Importing RecBole's sequential models imports recbole/model/sequential_recommender/
    # sine.py, which calls torch.autograd.set_detect_anomaly(True) at module level, i.e.
    # globally for the whole process (~25% slower training).  Import the package
    # explicitly now and switch anomaly detection back off right after.
    import recbole.model.sequential_recommender  # noqa: F401

    torch.autograd.set_detect_anomaly(False)
    return torch, recbole, Config, create_dataset, data_preparation, get_model, get_trainer, init_seed


def build_config_dict(args, data_path: Path, workdir: Path, write_item_file: bool, epochs: int):
    load_col = {"inter": ["user_id", "item_id", "timestamp"]}
    if write_item_file:
        load_col["item"] = ["item_id"]
    return {
        # data
        "data_path": str(data_path),
        "checkpoint_dir": str(workdir / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": load_col,
        # no filtering: our data is already k-core filtered
        "rm_dup_inter": None,
        "val_interval": None,
        "filter_inter_by_user_or_item": False,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": 50,
        # standard sequential protocol
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "train_neg_sample_args": None,
        "loss_type": "CE",
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [1, 5, 10, 20],
        "valid_metric": "NDCG@10",
        "stopping_step": 10,
        "epochs": epochs,
        "train_batch_size": 2048,
        "eval_batch_size": 4096,
        # environment
        "device": args.device,
        "use_gpu": args.device == "cuda",
        "gpu_id": "0" if args.device == "cuda" else "",
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "log_wandb": False,
        "state": "INFO",
    }
