"""Write a static report of a finished (or interrupted) Tune experiment: Markdown + PNGs.

Reads the experiment folder only (``ray.tune.ExperimentAnalysis``; nothing is re-run): all trials
sorted by the metric, each hyperparameter against it, learning curves, the best configuration,
Optuna's parameter importances (fANOVA) and, when ``jobs/tune.py`` tested the best trial, its test
metrics next to the baselines.

    python jobs/report.py --experiment runs/tune-ml100k-search-<hash>
    python jobs/report.py --experiment s3://bucket/runs/tune-ml1m-search-<hash> --out results/report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.train.report import read_json_in  # noqa: E402
from idle_ray.train.storage import absolute  # noqa: E402
from idle_ray.tune.search import LOG_SCALE, SEARCH_SPACE_FILE, SEARCHED, TEST_RESULTS_FILE  # noqa: E402



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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [t for t in trials if t["best"] is not None]
    fig, axes = plt.subplots(1, len(SEARCHED), figsize=(3.2 * len(SEARCHED), 3), sharey=True)
    for ax, k in zip(axes, SEARCHED):
        ax.scatter([t[k] for t in done], [t["best"] for t in done], s=18)
        if k in LOG_SCALE:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(k)
    axes[0].set_ylabel(f"best {metric}")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "params.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in done:
        ax.plot([e for e, _ in t["curve"]], [v for _, v in t["curve"]], marker="o", ms=3, lw=1,
                label=t["trial_id"][-8:])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if len(done) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "curves.png"), dpi=110)
    plt.close(fig)
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
        lines += ["## Best configuration", "", "| field | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(best.get(k))} |" for k in SEARCHED]
        lines += [f"| best {metric} | {best['best']:.4f} (trial {best['trial_id']}, {best['epochs']} epochs) |", ""]
    if test:
        lines += ["## Test (best trial, once) next to the baselines", "",
                  "| model | HR@5 | NDCG@5 | HR@10 | NDCG@10 |", "|---|---|---|---|---|"]
        for rec in test.get("records", []):
            f = rec["test"]["full"]
            lines.append(f"| {rec['variant']} | " + " | ".join(f"{f[k]:.4f}" for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10"))
                         + " |")
        lines.append("")
    lines += ["## All trials, best first", "",
              "| # | trial | " + " | ".join(SEARCHED) + f" | best {metric} | epochs | seconds | status |",
              "|---" * (len(SEARCHED) + 6) + "|"]
    for i, t in enumerate(trials, 1):
        lines.append(f"| {i} | {t['trial_id']} | " + " | ".join(_fmt(t.get(k)) for k in SEARCHED) +
                     f" | {_fmt(t['best'])} | {t['epochs']} | {t['seconds']:.0f} | {t['status']} |")
    lines += ["", "## Each hyperparameter against the metric", "", "![params](params.png)", "",
              "## Learning curves (validation, per epoch)", "", "![curves](curves.png)", ""]
    lines += ["## Parameter importances (Optuna fANOVA over the trials' best values)", ""]
    if imp:
        lines += ["| field | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in imp.items()]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="the Tune experiment folder (local path or s3:// / gs:// URI)")
    p.add_argument("--out", default="", help="report folder (default: results/report/<experiment name>)")
    p.add_argument("--metric", default="val_ndcg@10")
    args = p.parse_args(argv)
    exp = args.experiment.rstrip("/")
    if "://" not in exp and not os.path.isdir(exp):
        cli.fail(FileNotFoundError(f"--experiment {exp}: no such folder; pass the experiment folder that "
                                   "jobs/tune.py printed (under train.storage_path)"))
    exp = absolute(exp)  # Tune reads a relative path as a URI without a scheme
    out = args.out or os.path.join("results", "report", os.path.basename(exp))
    path = write_report(exp, out, args.metric)
    print(f"[report] wrote {path} (+ params.png, curves.png, trials.json)")


if __name__ == "__main__":
    cli.run_main(main)
