"""Benchmark: OptunaSearch (TPE) + ASHA against a full grid over the same space, on a small budget.

Runs ``jobs/tune.py --grid`` (every point of ``tune.grid`` trained for ``train.epochs``) and
``jobs/tune.py`` (``tune.num_samples`` trials from the same ranges, ASHA stopping weak ones) with
the same config, then prints their best validation metric and their trial-time: the sum of the
trials' own training time (what a cluster pays for) and, independent of how busy the machine was,
the sum of the epochs the trials trained. Targets: the search reaches >= 98% of the
grid's best using <= 1/3 of its trial-time. ``--seeds`` repeats the search with other seeds and
reports the median. Both experiments resume if interrupted (rerun the same command).

    python benchmarks/tune_vs_grid.py --config configs/tune_bench_ml100k.yaml
    python benchmarks/tune_vs_grid.py --config configs/tune_bench_ml100k.yaml --seeds 0,1,2
    python benchmarks/tune_vs_grid.py --config configs/tune_bench_ml100k.yaml --search-set tune.reduction_factor=3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(config: str, sets: list[str], grid: bool) -> dict:
    """One ``jobs/tune.py`` experiment; returns its summary (``test_results.json``)."""
    from idle_ray.config import load_config
    from idle_ray.train.storage import read_json_in
    from idle_ray.tune.experiment import experiment_location
    from idle_ray.tune.search import TEST_RESULTS_FILE

    cmd = [sys.executable, os.path.join(ROOT, "jobs/tune.py"), "--config", config, "--no-test"]
    cmd += ["--grid"] if grid else []
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    _, exp = experiment_location(load_config(config, sets), grid)
    summary = read_json_in(exp, TEST_RESULTS_FILE)
    if summary is None:
        raise FileNotFoundError(f"{exp}/{TEST_RESULTS_FILE} is missing after {' '.join(cmd)}")
    return summary


def trial_epochs(summary: dict) -> int:
    return sum(t["epochs"] for t in summary["trials"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs/tune_bench_ml100k.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--search-set", dest="search_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides for the search only, e.g. its ASHA settings (the grid has no scheduler)")
    p.add_argument("--seeds", default="0", help="search seeds (comma list); the median is reported")
    p.add_argument("--json", default="", help="also write the table's numbers here")
    args = p.parse_args(argv)

    grid = run(args.config, args.overrides, grid=True)
    searches = [run(args.config, args.overrides + args.search_overrides + [f"seed={s}"], grid=False)
                for s in args.seeds.split(",")]
    best_ratio = statistics.median(s["best_val"] / grid["best_val"] for s in searches)
    time_ratio = statistics.median(s["trial_seconds"] / grid["trial_seconds"] for s in searches)
    epoch_ratio = statistics.median(trial_epochs(s) / trial_epochs(grid) for s in searches)
    rows = [("grid", len(grid["trials"]), grid["trial_seconds"], trial_epochs(grid), grid["best_val"])]
    rows += [(f"search seed {s}", len(r["trials"]), r["trial_seconds"], trial_epochs(r), r["best_val"])
             for s, r in zip(args.seeds.split(","), searches)]
    print(f"\n| experiment | trials | trial-time s | trial-epochs | best {grid['metric']} |\n|---|---|---|---|---|")
    for name, n, secs, epochs, best in rows:
        print(f"| {name} | {n} | {secs:.0f} | {epochs} | {best:.4f} |")
    ok_best, ok_time = best_ratio >= 0.98, time_ratio <= 1 / 3
    print(f"\nsearch / grid (median over {len(searches)} seed(s)): best {best_ratio:.3f} "
          f"(target >= 0.98: {'met' if ok_best else 'NOT met'}), trial-time {time_ratio:.3f} "
          f"(target <= 0.333: {'met' if ok_time else 'NOT met'}), trial-epochs {epoch_ratio:.3f}")
    if args.json:
        from idle_ray.results.files import write_json
        write_json(args.json, {"rows": rows, "best_ratio": best_ratio, "time_ratio": time_ratio,
                               "epoch_ratio": epoch_ratio,
                               "grid_experiment": grid["experiment"],
                               "search_experiments": [s["experiment"] for s in searches]})


if __name__ == "__main__":
    main()
