"""jobs/evaluate.py end to end on tiny inputs.

One real ``jobs/train.py`` run (pre-train SASRec, train IDLE on the tiny decoder under Ray Train +
DeepSpeed, test once) makes the inputs; then ``jobs/evaluate.py``

* on the run by name reproduces the training job's test metrics exactly (same weights, same protocol);
* on the ID-model artifact's validation split reproduces the validation score pre-training selected it by;
* refuses bad input before any model or Ray starts, with exit code 2 and one line naming the file and the
  fix: a missing file, a file that is not safetensors, pre-training weights, weights from another config,
  from another item vocabulary, and a foreign file without idle_ray metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiny_jobs import run_job, write_tiny_config, write_tiny_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work folder, config path, the train job's result record)."""
    work = tmp_path_factory.mktemp("evaluate")
    inter, items = write_tiny_data(work)
    config = write_tiny_config(work / "tiny.yaml", inter, items, work, str(work / "runs"))
    r = run_job("train.py", "--config", config, "--output", work / "train.json", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, config, json.loads((work / "train.json").read_text())


def evaluate_cli(argv, capsys) -> tuple[int, str]:
    """jobs/evaluate.py in this process (bad input never reaches Ray): (exit code, stderr)."""
    from idle_ray import cli
    from jobs.evaluate import main
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, [str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


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


def test_bad_weights_exit_2_naming_file_and_fix(trained, tmp_path, capsys):
    work, config, record = trained
    best = Path(record["checkpoint"]) / "best_trainable.safetensors"

    code, err = evaluate_cli(["--config", config, "--weights", tmp_path / "missing.safetensors"], capsys)
    assert code == 2 and "missing.safetensors: weights file not found" in err and "Fix:" in err

    (tmp_path / "junk.safetensors").write_text("not weights")
    code, err = evaluate_cli(["--config", config, "--weights", tmp_path / "junk.safetensors"], capsys)
    assert code == 2 and "junk.safetensors: not a safetensors weights file" in err

    pretrain_runs = sorted((work / "runs" / "sasrec").glob("checkpoint_*/best_trainable.safetensors"))
    code, err = evaluate_cli(["--config", config, "--weights", pretrain_runs[-1]], capsys)
    assert code == 2 and "these are pretrain weights" in err and "id_model" in err

    code, err = evaluate_cli(["--config", config, "--weights", best, "--set", "adapter.prompt_length=3"], capsys)
    assert code == 2 and str(best) in err and "trained with another config" in err
    assert "adapter.prompt_length = 2 in the weights, 3 in the config" in err
    assert "--set adapter.prompt_length=2" in err

    code, err = evaluate_cli(["--config", config, "--run", "no-such-run"], capsys)
    assert code == 2 and "no such run" in err and record["run"] in err  # lists the runs that exist

    # another dataset (other items): the weights' vocabulary is checked before anything else
    inter, items = write_tiny_data(tmp_path / "other", n_items=25, seed=1)
    code, err = evaluate_cli(["--config", config, "--weights", best, "--set", f"data.path={inter}",
                              "--set", f"data.items_path={items}", "--set", f"data.output_dir={tmp_path / 'data'}"],
                             capsys)
    assert code == 2 and str(best) in err and "another item vocabulary" in err and "Fix:" in err

    # a file without idle_ray metadata is loaded into the config's model to check it
    save_file({"adapter.head.proj.weight": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    code, err = evaluate_cli(["--config", config, "--weights", tmp_path / "foreign.safetensors"], capsys)
    assert code == 2 and "foreign.safetensors: does not fit this config's adapter" in err
