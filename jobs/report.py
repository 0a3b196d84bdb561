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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


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
    from idle_ray.train.storage import absolute
    from idle_ray.tune.report import write_report

    exp = absolute(exp)  # Tune reads a relative path as a URI without a scheme
    out = args.out or os.path.join("results", "report", os.path.basename(exp))
    path = write_report(exp, out, args.metric)
    print(f"[report] wrote {path} (+ params.png, curves.png, trials.json)")


if __name__ == "__main__":
    cli.run_main(main)
