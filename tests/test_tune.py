"""Ray Tune: the search space and concurrency rules, then one real search end to end.

The end-to-end test runs ``jobs/tune.py`` (real Ray Tune + OptunaSearch + ASHA, each trial a
real Ray Train + DeepSpeed run of a tiny decoder), kills the driver mid-search, reruns the same
command (``Tuner.restore``), checks every trial finished exactly once and that ASHA stopped some
(their resources were released: later trials ran), then builds the report with ``jobs/report.py``.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray import tune

from tiny_jobs import tiny_tune_sets
from idle_ray.config import ConfigError, load_config
from idle_ray.tune.capacity import max_resources_from_autoscaler_config
from idle_ray.tune.search import (SEARCHED, apply_params, grid_space, max_concurrent_trials, search_space,
                                  trial_resources, unfinished_trials)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tune_ml100k.yaml"


def test_search_space_follows_the_config():
    cfg = load_config(CONFIG, ["tune.prompt_length=[2, 6]", "tune.projection_width=[32, 64]"])
    space = search_space(cfg.tune)
    assert set(space) == set(SEARCHED)
    assert isinstance(space["prompt_length"], tune.search.sample.Integer)
    assert (space["prompt_length"].lower, space["prompt_length"].upper) == (2, 7)  # randint: upper exclusive
    assert space["projection_width"].categories == [32, 64]
    assert isinstance(space["mmd_weight"].sampler, tune.search.sample.LogUniform)
    assert isinstance(space["lr"].sampler, tune.search.sample.LogUniform)


def test_apply_params_writes_the_trial_values():
    cfg = load_config(CONFIG)
    out = apply_params(cfg, {"prompt_length": 5, "projection_width": 128, "mmd_weight": 0.02, "lr": 3e-4})
    assert (out.adapter.prompt_length, out.adapter.projection_width, out.adapter.mmd_weight, out.train.lr) == \
        (5, 128, 0.02, 3e-4)
    assert out.adapter.refine_bottleneck == cfg.adapter.refine_bottleneck and cfg.train.lr != 3e-4


def test_max_concurrent_trials_from_cluster_resources():
    cfg = load_config(CONFIG)  # 2 workers x 0.5 CPU per trial
    assert trial_resources(cfg) == {"CPU": 1.0}
    assert max_concurrent_trials(cfg, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(cfg, {"CPU": 16.0}) == 8  # capped by num_samples
    assert max_concurrent_trials(cfg, {"CPU": 0.5}) == 1  # never 0: one trial queues for resources
    gpu = load_config(CONFIG, ["train.use_gpu=true", "train.cpus_per_worker=4", "tune.num_samples=20"])
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs are the limit
    assert max_concurrent_trials(load_config(CONFIG, ["tune.max_concurrent_trials=3"]), {"CPU": 2.0}) == 3
    assert max_concurrent_trials(cfg, {"CPU": math.inf}) == 8  # an unbounded autoscaler: num_samples


def test_autoscaler_config_maximum():
    """Node types at their max_workers (capped by the global one) plus the head, as the autoscaler may grow."""
    config = {"max_workers": 5, "head_node_type": "head",
              "available_node_types": {
                  "head": {"resources": {"CPU": 0}, "max_workers": 0},
                  "gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0},  # the global cap: 5
                  "cpu": {"resources": {"CPU": 4}, "max_workers": 2},
                  "big": {"resources": {"CPU": 64, "GPU": 8}, "max_workers": 9}}}  # capped at 5
    assert max_resources_from_autoscaler_config(config) == {"CPU": 5 * 8 + 2 * 4 + 5 * 64, "GPU": 5 + 5 * 8}
    head_works = {"head_node_type": "h", "available_node_types": {"h": {"resources": {"CPU": 2}, "max_workers": 1}}}
    assert max_resources_from_autoscaler_config(head_works) == {"CPU": 4}  # the head itself plus one more


def test_grid_space_and_its_errors():
    cfg = load_config(CONFIG)
    grid = grid_space(cfg.tune)
    assert grid["lr"] == {"grid_search": [0.001, 0.003]}
    with pytest.raises(ValueError, match="tune.grid is empty"):
        grid_space(load_config(CONFIG, ["tune.grid={}"]).tune)
    with pytest.raises(ConfigError, match="tune.grid"):
        load_config(CONFIG, ["tune.grid={batch_size: [1, 2]}"])


# ----------------------------------------------------------------------------- end to end

def _trial_results(exp: Path) -> dict[str, list[dict]]:
    out = {}
    for d in exp.iterdir():
        f = d / "result.json"
        if d.is_dir() and f.exists():
            out[d.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _result_grid(exp: Path) -> tune.ResultGrid:
    return tune.ResultGrid(tune.ExperimentAnalysis(str(exp)))


@pytest.mark.slow  # 7 min; jobs/tune.py end to end stays in the default suite: tests/test_tune_autoscaling.py
@pytest.mark.timeout(1500)
def test_tune_job_search_restore_and_report(tmp_path):
    sets = tiny_tune_sets(tmp_path)
    cmd = [sys.executable, str(ROOT / "jobs/tune.py"), "--config", str(CONFIG), "--baselines", "id_only", *sets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = tmp_path / "runs"
    tune_cfg = load_config(CONFIG, sets[1::2]).tune

    def experiment() -> Path | None:
        exps = [p for p in runs.glob("tune-ml100k-search-*") if (p / "search_space.json").exists()] \
            if runs.exists() else []
        return exps[0] if exps else None

    def reported() -> int:
        return sum(len(rows) for rows in _trial_results(experiment()).values()) if experiment() else 0

    def start_until(name: str, n_results: int) -> subprocess.Popen:
        """Start the job and return once more than ``n_results`` epoch results are on disk."""
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and reported() <= n_results:
            time.sleep(2)
        assert proc.poll() is None, f"the search ended before it could be interrupted: {log_path.read_text()[-3000:]}"
        assert reported() > n_results, f"no new trial result within 15 min: {log_path.read_text()[-3000:]}"
        return proc

    # 1. Kill the driver and its embedded Ray (SIGKILL, a lost head) once the first epoch results are in.
    first = start_until("first", 0)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3)
    exp = experiment()
    assert unfinished_trials(_result_grid(exp), tune_cfg, grid=False) > 0
    assert not (exp / "test_results.json").exists()

    # 2. Restore, then Ctrl-C the driver after one more result: Tune returns from `fit` normally
    # here, so the job must see the unfinished trials and exit 130 without a summary.
    second = start_until("second", reported())
    os.kill(second.pid, signal.SIGINT)
    assert second.wait(timeout=300) == 130, (tmp_path / "second.log").read_text()[-4000:]
    second_log = (tmp_path / "second.log").read_text()
    assert "[tune] restoring" in second_log and "was interrupted with" in second_log
    assert not (exp / "test_results.json").exists()

    # 3. Restore again and finish.
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1200)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-3000:]
    assert "[tune] restoring" in third.stdout

    assert unfinished_trials(_result_grid(exp), tune_cfg, grid=False) == 0
    summary = json.loads((exp / "test_results.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6
    assert all(t["best"] is not None and not t["error"] for t in trials)
    # Exactly once: every trial's epochs were reported once each, in order, none past the budget.
    results = _trial_results(exp)
    assert len(results) == 6
    for tid, rows in results.items():
        epochs = [r["epoch"] for r in rows]
        assert epochs == list(range(1, len(epochs) + 1)), (tid, epochs)
        assert 1 <= len(epochs) <= 3
    # ASHA stopped some trials early, and the trials after them still got resources and ran.
    assert any(len(rows) < 3 for rows in results.values()), {k: len(v) for k, v in results.items()}
    assert any(len(rows) == 3 for rows in results.values())
    # Each trial's Train run lives by name beside the experiment and trained each epoch once
    # (a trial interrupted by the kill resumed its Train run instead of starting over). A run
    # that ASHA stopped may have finished one more epoch before its workers were stopped.
    for tid, rows in results.items():
        run = runs / f"{exp.name}-{tid}"
        newest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
        state = json.loads((newest / "train_state.json").read_text())
        trained = [h["epoch"] for h in state["history"]]
        assert trained == list(range(1, len(trained) + 1)) and len(trained) - len(rows) in (0, 1), (tid, trained)
        assert trained[:len(rows)] == [r["epoch"] for r in rows]
        assert state["step"] == len(trained) * 6  # 48 samples / batch 8 per epoch
    # The best trial was tested once, next to the SASRec baseline.
    variants = [r["variant"] for r in summary["test"]["records"]]
    assert variants == ["idle (tuned)", "id_only"]
    assert all(r["test"]["users"] == 24 for r in summary["test"]["records"])
    assert summary["best_val"] == max(t["best"] for t in trials)

    rep = subprocess.run([sys.executable, str(ROOT / "jobs/report.py"), "--experiment", os.path.relpath(exp, tmp_path),
                          "--out", str(tmp_path / "report")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Best configuration" in md and "idle (tuned)" in md
    assert md.count("| TERMINATED |") == 6
    for png in ("params.png", "curves.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    imp = json.loads((tmp_path / "report" / "trials.json").read_text())["importances"]
    assert set(imp) == set(SEARCHED) and abs(sum(imp.values()) - 1) < 1e-6

    missing = subprocess.run([sys.executable, str(ROOT / "jobs/report.py"), "--experiment",
                              str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
