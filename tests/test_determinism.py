"""Same seed, config and thread count -> the same numbers: a tiny training job run twice from scratch.

Each run is ``jobs/train.py`` in its own process with its own embedded Ray: prepare, pre-train SASRec
on 2 Ray Train workers, train IDLE (score fusion) on 2 workers under DeepSpeed ZeRO-2, test once. The
first is the session's tiny train job (``conftest.tiny_train_job``, which the evaluate and recommend
tests read), the second is run here. The runs share nothing on disk (separate input, data, artifact
and run folders), so equal metrics mean the stream of samples (seeded global shuffle, order-preserving
reads, ``user % world`` shares), the initialisation and the arithmetic are the same.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny_jobs import TINY_TRAIN_JOB, train_tiny


@pytest.mark.timeout(1800)  # two whole jobs, each starting its own Ray
def test_two_fresh_runs_give_identical_metrics(tiny_train_job, tmp_path):
    first, _, a = tiny_train_job
    _, b = train_tiny(tmp_path / "second", **TINY_TRAIN_JOB)  # its own input, data, artifact and runs
    assert a["torch_threads"] == b["torch_threads"] == 1  # recorded with the result
    assert a["steps"] == b["steps"] > 0
    assert a["best_val_ndcg_at_10"] == pytest.approx(b["best_val_ndcg_at_10"], abs=1e-6)
    for key, value in a["test"]["full"].items():
        assert value == pytest.approx(b["test"]["full"][key], abs=1e-6), key
    sasrec = [load_file(str(work / "sasrec" / "model.safetensors")) for work in (first, tmp_path / "second")]
    assert sasrec[0].keys() == sasrec[1].keys()
    for key in sasrec[0]:
        assert torch.allclose(sasrec[0][key], sasrec[1][key], atol=1e-6), key
