"""jobs/evaluate.py end to end on tiny inputs.

One real ``jobs/train.py`` run (pre-train SASRec, train IDLE on the tiny decoder under Ray Train +
DeepSpeed, test once; the session's ``tiny_train_job``) makes the inputs; then ``jobs/evaluate.py``

* on the run by name reproduces the training job's test metrics exactly (same weights, same protocol);
* on the ID-model artifact's validation split reproduces the validation score pre-training selected it by;
* refuses bad input before any model or Ray starts (``idle_ray.train.runs.evaluation_inputs``; the job
  exits with code 2 and one line) naming the file and the fix: a missing file, a file that is not safetensors, pre-training weights, weights from another config,
  from another item vocabulary, and a foreign file without idle_ray metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiny_jobs import run_job, write_tiny_data


@pytest.fixture(scope="module")
def trained(tiny_train_job):
    """(work folder, config path, the train job's result record): the session's tiny train job."""
    return tiny_train_job


def evaluate_inputs(config, *sets, **kw) -> str:
    """The evaluate job's checks (``idle_ray.train.runs.evaluation_inputs``, no model or Ray): the
    error message they raise."""
    from idle_ray.config import ConfigError, load_config
    from idle_ray.models.artifact import ArtifactError
    from idle_ray.train.runs import evaluation_inputs
    with pytest.raises((ConfigError, ArtifactError)) as e:
        evaluation_inputs(load_config(str(config), list(sets)), **{k: str(v) for k, v in kw.items()})
    return str(e.value)


def test_evaluate_run_by_name_reproduces_the_train_jobs_test(trained):
    work, config, record = trained
    out = work / "eval_run.json"
    r = run_job("evaluate.py", "--config", config, "--run", record["run"], "--output", out, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["test"] == record["test"]  # the same best weights under the same protocol: exactly equal
    assert result["test"]["users"] == 24 and result["run"] == record["run"]
    assert result["weights"] == str(Path(record["checkpoint"]) / "best_trainable.safetensors")
    assert f"mrr {record['test']['full']['mrr']:.4f}" in r.stdout and f"wrote {out}" in r.stdout
    with safe_open(result["weights"], "pt") as f:  # the worker records what the weights belong to
        meta = f.metadata()
    assert meta["idle_ray.task"] == "adapter"
    assert json.loads(meta["idle_ray.config"])["adapter.prompt_length"] == 2


def test_evaluate_id_model_on_valid_matches_pretraining_selection(trained):
    work, config, _ = trained
    out = work / "eval_id.json"
    r = run_job("evaluate.py", "--config", config, "--kind", "id_model", "--split", "valid", "--output", out, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    artifact = json.loads((work / "sasrec" / "model.json").read_text())
    assert result["kind"] == "id_model" and result["valid"]["users"] == 24
    assert result["valid"]["full"]["ndcg@10"] == pytest.approx(artifact["best_val_ndcg@10"], abs=1e-9)


def test_bad_weights_exit_2_naming_file_and_fix(trained, tmp_path):
    work, config, record = trained
    best = Path(record["checkpoint"]) / "best_trainable.safetensors"

    # the job itself: exit code 2 and one line (the checks below run in this process)
    r = run_job("evaluate.py", "--config", config, "--weights", tmp_path / "missing.safetensors", cwd=work, timeout=300)
    assert r.returncode == 2 and "missing.safetensors: weights file not found" in r.stderr and "Fix:" in r.stderr

    (tmp_path / "junk.safetensors").write_text("not weights")
    err = evaluate_inputs(config, weights=tmp_path / "junk.safetensors")
    assert "junk.safetensors: not a safetensors weights file" in err

    pretrain_runs = sorted((work / "runs" / "sasrec").glob("checkpoint_*/best_trainable.safetensors"))
    err = evaluate_inputs(config, weights=pretrain_runs[-1])
    assert "these are pretrain weights" in err and "id_model" in err

    err = evaluate_inputs(config, "adapter.prompt_length=3", weights=best)
    assert str(best) in err and "trained with another config" in err
    assert "adapter.prompt_length = 2 in the weights, 3 in the config" in err
    assert "--set adapter.prompt_length=2" in err

    err = evaluate_inputs(config, run="no-such-run")
    assert "no such run" in err and record["run"] in err  # lists the runs that exist

    # another dataset (other items): the weights' vocabulary is checked before anything else
    inter, items = write_tiny_data(tmp_path / "other", n_items=25, seed=1)
    err = evaluate_inputs(config, f"data.path={inter}", f"data.items_path={items}",
                          f"data.output_dir={tmp_path / 'data'}", weights=best)
    assert str(best) in err and "another item vocabulary" in err and "Fix:" in err

    # a file without idle_ray metadata is loaded into the config's model to check it
    save_file({"adapter.head.proj.weight": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    err = evaluate_inputs(config, weights=tmp_path / "foreign.safetensors")
    assert "foreign.safetensors: does not fit this config's adapter" in err
