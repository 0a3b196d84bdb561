"""The static report of a Tune experiment (Markdown + PNGs + trials.json), read from its folder only.

Tune-specific (it reads trials through ``ray.tune.ExperimentAnalysis`` and scores importances with
Optuna's fANOVA), so it lives under ``idle_ray/tune/``; its tables, plots and files come from
:mod:`idle_ray.results`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from idle_ray.results.plots import curves_plot, scatter_panels
from idle_ray.results.records import by_variant
from idle_ray.results.tables import markdown_table, metrics_table
from idle_ray.train.storage import read_json_in
from idle_ray.tune.experiment import TEST_COLUMNS
from idle_ray.tune.search import LOG_SCALE, SEARCH_SPACE_FILE, SEARCHED, TEST_RESULTS_FILE


def load_trials(path: str, metric: str) -> list[dict]:
    """One dict per trial: id, status, values, per-epoch metric curve, best value, time."""
    from ray.tune import ExperimentAnalysis
    analysis = ExperimentAnalysis(path, default_metric=metric, default_mode="max")
    frames = analysis.trial_dataframes
    trials = []
    for t in analysis.trials:
        # keyed by the trial folder's path relative to the experiment (absolute in older Rays)
        df = frames.get(os.path.basename(t.path.rstrip("/")), frames.get(t.path))
        ok = df is not None and len(df) and metric in df.columns
        curve = []
        if ok:
            df = df.dropna(subset=[metric])
            x = df["epoch"] if "epoch" in df.columns else df["training_iteration"]
            curve = [(int(e), float(v)) for e, v in zip(x, df[metric])]
        trials.append({"trial_id": t.trial_id, "status": t.status,
                       **{k: t.config.get(k) for k in SEARCHED if k in t.config},
                       "curve": curve, "best": max((v for _, v in curve), default=None),
                       "epochs": max((e for e, _ in curve), default=0),
                       "seconds": float(df["time_total_s"].max()) if ok and "time_total_s" in df.columns else 0.0})
    return sorted(trials, key=lambda r: -math.inf if r["best"] is None else r["best"], reverse=True)


def _distribution(key: str, seen: list, declared):
    """The field's search distribution (from search_space.json, else the values seen)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    if key == "projection_width":
        return CategoricalDistribution(sorted(set(declared or seen)))
    lo, hi = declared or (min(seen), max(seen))
    if key == "prompt_length":
        return IntDistribution(int(lo), int(hi))
    return FloatDistribution(float(lo), float(hi), log=key in LOG_SCALE)


def importances(trials: list[dict], space: dict | None) -> dict:
    """Optuna's fANOVA importances of the searched fields for the best value each trial reached."""
    import optuna
    done = [t for t in trials if t["best"] is not None and all(k in t for k in SEARCHED)]
    if len(done) < 2:
        return {}
    dists = {k: _distribution(k, [t[k] for t in done], (space or {}).get(k)) for k in SEARCHED}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in done:
        study.add_trial(optuna.trial.create_trial(params={k: t[k] for k in SEARCHED}, distributions=dists,
                                                  value=t["best"]))
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.4f}"
    return "-" if v is None else str(v)


def plots(trials: list[dict], metric: str, folder: str) -> list[str]:
    """``params.png`` (each searched field against the best metric) and ``curves.png`` in ``folder``."""
    done = [t for t in trials if t["best"] is not None]
    scatter_panels({k: [t[k] for t in done] for k in SEARCHED}, [t["best"] for t in done],
                   os.path.join(folder, "params.png"), f"best {metric}", log_x=LOG_SCALE)
    curves_plot({t["trial_id"][-8:]: t["curve"] for t in done}, os.path.join(folder, "curves.png"), "epoch", metric)
    return ["params.png", "curves.png"]


def render(path: str, metric: str, trials: list[dict], imp: dict, test: dict | None) -> str:
    n_err = sum(1 for t in trials if t["status"] == "ERROR")
    max_epoch = max((t["epochs"] for t in trials), default=0)
    stopped = sum(1 for t in trials if t["best"] is not None and t["epochs"] < max_epoch)
    lines = [f"# Tune report: {os.path.basename(path.rstrip('/'))}", "",
             f"Experiment `{path}`; metric **{metric}** (maximised). {len(trials)} trials: "
             f"{sum(1 for t in trials if t['best'] is not None)} reported, {stopped} stopped early by ASHA, {n_err} errored; "
             f"trial time {sum(t['seconds'] for t in trials):.0f} s in total.", ""]
    best = next((t for t in trials if t["best"] is not None), None)
    if best:
        lines += ["## Best configuration", ""]
        lines += markdown_table(["field", "value"], [[k, _fmt(best.get(k))] for k in SEARCHED] + [
            [f"best {metric}", f"{best['best']:.4f} (trial {best['trial_id']}, {best['epochs']} epochs)"]])
        lines.append("")
    if test:
        lines += ["## Test (best trial, once) next to the baselines", "",
                  metrics_table(by_variant(test.get("records", [])), TEST_COLUMNS), ""]
    lines += ["## All trials, best first", ""]
    lines += markdown_table(["#", "trial", *SEARCHED, f"best {metric}", "epochs", "seconds", "status"],
                            [[i, t["trial_id"], *(_fmt(t.get(k)) for k in SEARCHED), _fmt(t["best"]), t["epochs"],
                              f"{t['seconds']:.0f}", t["status"]] for i, t in enumerate(trials, 1)])
    lines += ["", "## Each hyperparameter against the metric", "", "![params](params.png)", "",
              "## Learning curves (validation, per epoch)", "", "![curves](curves.png)", ""]
    lines += ["## Parameter importances (Optuna fANOVA over the trials' best values)", ""]
    if imp:
        lines += markdown_table(["field", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()])
    else:
        lines.append("Fewer than two finished trials: no importances.")
    return "\n".join(lines) + "\n"


def write_report(experiment: str, out: str, metric: str) -> str:
    """Build the report in a temp folder and rename it into place (never half-written)."""
    trials = load_trials(experiment, metric)
    if not trials:
        raise ValueError(f"{experiment}: no trials found; pass the folder jobs/tune.py printed")
    space = read_json_in(experiment, SEARCH_SPACE_FILE)
    test = read_json_in(experiment, TEST_RESULTS_FILE)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        plots(trials, metric, tmp)
        imp = importances(trials, space)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(render(experiment, metric, trials, imp, (test or {}).get("test")))
        with open(os.path.join(tmp, "trials.json"), "w") as f:
            json.dump({"experiment": experiment, "metric": metric, "trials": trials, "importances": imp}, f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out, "report.md")
