import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP barrier stalls when
    the 2-core CI box is shared. Restored after the module that asks for it."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def installed(package: str) -> bool:
    """Whether the distribution ``package`` is installed (optional asset packages: tests skip without them)."""
    import importlib.metadata
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end checks (run with -m slow)")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, like CI)."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    yield ray


def synthetic_interactions(n_users=40, n_items=30, min_len=6, max_len=20, seed=0) -> pd.DataFrame:
    """Deterministic interaction log with a learnable pattern (next item = previous + 1 mod n)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(0, n_items))
        for t in range(n):
            rows.append((f"u{u}", f"i{(start + t) % n_items}", 1_000_000 + 10 * t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def write_tiny_csv(folder):
    """``inter.csv`` (:func:`synthetic_interactions`) and ``items.csv`` (titles) in ``folder``."""
    df = synthetic_interactions()
    p = folder / "inter.csv"
    df.to_csv(p, index=False)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)], "title": [f"Movie {i}" for i in range(30)]})
    ip = folder / "items.csv"
    items.to_csv(ip, index=False)
    return p, ip


def prepare_tiny(folder, csv):
    """The tiny log prepared into ``folder/prepared`` (7 users a shard)."""
    from idle_ray.data.prepare import prepare_dataset
    p, ip = csv
    return prepare_dataset("csv", folder / "prepared", path=str(p), items_path=str(ip),
                           min_user_interactions=5, min_item_interactions=1, rows_per_shard=7, log=lambda *a: None)


@pytest.fixture
def tiny_csv(tmp_path):
    return write_tiny_csv(tmp_path)


@pytest.fixture
def tiny_prepared(tiny_csv, tmp_path):
    return prepare_tiny(tmp_path, tiny_csv)


@pytest.fixture(scope="session")
def tiny_train_job(tmp_path_factory):
    """One real ``jobs/train.py`` run on the tiny data, in its own process with its own embedded Ray
    (prepare, pre-train SASRec on 2 Ray Train workers, train IDLE on the tiny decoder on 2 workers under
    DeepSpeed ZeRO-2, 2 epochs, test once): ``(work folder, config path, result record)``. The model
    of the evaluate and recommend job tests and the first of the determinism test's two fresh runs;
    those tests read its data, artifact and run folders and write nothing into them."""
    from tiny_jobs import TINY_TRAIN_JOB, train_tiny
    work = tmp_path_factory.mktemp("tiny_train_job")
    return (work, *train_tiny(work, **TINY_TRAIN_JOB))
