"""Search the adapter's prompt length, projection width, MMD weight and learning rate with Ray Tune
(OptunaSearch TPE + ASHA on validation NDCG@10), then test the best trial once next to the baselines.

    python jobs/tune.py --config configs/tune_ml100k.yaml
    python jobs/tune.py --config configs/tune_ml100k.yaml --grid      (full grid over tune.grid: benchmark)
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_ml1m.yaml
    python jobs/report.py --experiment runs/<experiment name>          (static report of the search)

Rerunning the same command resumes an interrupted search (``Tuner.restore``): finished trials are
kept, unfinished ones continue from their last Train checkpoint. Each trial's curves are in
TensorBoard (``tensorboard --logdir <train.storage_path>``) and the search in the Ray dashboard.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.config import config_hash  # noqa: E402
from idle_ray.tune.search import SEARCH_SPACE_FILE, SEARCHED, TEST_RESULTS_FILE  # noqa: E402



def experiment_name(cfg, grid: bool) -> str:
    return f"{cfg.name}-{'grid' if grid else 'search'}-{config_hash(cfg)[:8]}"


def experiment_location(cfg, grid: bool):
    """``(cfg, folder)``: the config as the trials get it (``train.storage_path`` resolved here:
    trials run in other processes and folders) and the experiment folder, whose name hashes that
    config. Anything that looks for an experiment by its config (the benchmark) calls this too."""
    from idle_ray.train.storage import absolute, join

    storage = absolute(cfg.train.storage_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=storage))
    return cfg, join(storage, experiment_name(cfg, grid))


def trial_rows(results, metric: str) -> list[dict]:
    """One row per trial: its values, best metric, epochs reached, status, time."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        has = df is not None and metric in getattr(df, "columns", ())
        rows.append({"trial_id": r.metrics.get("trial_id") if r.metrics else os.path.basename(r.path),
                     **{k: r.config.get(k) for k in SEARCHED if k in r.config},
                     "best": float(df[metric].max()) if has else None,
                     "epochs": int(df["epoch"].max()) if has else 0,
                     "seconds": float(df["time_total_s"].max()) if has else 0.0,
                     "error": repr(r.error) if r.error else ""})
    return sorted(rows, key=lambda x: -1.0 if x["best"] is None else x["best"], reverse=True)


def evaluate_best(cfg, prepared, artifact, best, baselines: list[str], log=print) -> dict:
    """The best trial's validation-selected adapter on test, once, next to the baselines."""
    from idle_ray.train import storage as run_storage
    from idle_ray.train.evaluate import evaluate_adapter
    from idle_ray.train.checkpoints import CKPT_WEIGHTS
    from idle_ray.tune.search import apply_params
    from jobs.train import train_and_test

    best_cfg = apply_params(cfg, best.config)
    ckpt = best.metrics["checkpoint_path"]
    if run_storage.is_uri(cfg.train.storage_path) and not run_storage.is_uri(ckpt):
        ckpt = cfg.train.storage_path.split("://", 1)[0] + "://" + ckpt  # reported without its scheme
    weights = run_storage.join(ckpt, "best_" + CKPT_WEIGHTS)
    record = {"variant": "idle (tuned)", "params": {k: best.config[k] for k in best.config},
              "test": evaluate_adapter(best_cfg, prepared, "test", weights, artifact)}
    records = [record]
    for variant in baselines:
        log(f"[tune] baseline {variant}")
        base = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, variant=variant))
        records.append(train_and_test(base, prepared, artifact))
    return {"weights": weights, "records": records}


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--grid", action="store_true", help="run the full grid over tune.grid instead of the search")
    p.add_argument("--baselines", default="id_only,llm_only",
                   help="variants trained/evaluated on test next to the tuned adapter (comma list; '' for none)")
    p.add_argument("--no-test", action="store_true", help="search only; skip the test evaluation")
    args, cfg = cli.parse(p, argv)
    import ray
    from ray import tune

    from idle_ray.data.prepare import format_summary
    from idle_ray.train import builders
    from idle_ray.train.launch import check_storage, ensure_ray
    from idle_ray.train.report import write_json_in
    from idle_ray.tune.search import max_concurrent_trials, restore_or_build, unfinished_trials
    from jobs.pretrain import pretrain

    if args.grid and not cfg.tune.grid:
        cli.fail(ValueError("--grid needs tune.grid in the config: values per field, e.g. "
                            "tune.grid: {prompt_length: [2, 8], lr: [0.001, 0.003]}"))
    t0 = time.time()
    prepared = builders.prepare_from_config(cfg)
    print(format_summary(prepared), flush=True)
    artifact, _ = pretrain(cfg, prepared)
    ensure_ray()
    check_storage(cfg.train.storage_path, cfg.train.num_workers)
    cfg, exp = experiment_location(cfg, args.grid)
    storage, name = cfg.train.storage_path, experiment_name(cfg, args.grid)
    concurrent = max_concurrent_trials(cfg, ray.cluster_resources())
    print(f"[tune] experiment {exp}: {concurrent} trial(s) at once", flush=True)
    # The declared space, so the report's importances use the real ranges (not the values seen).
    write_json_in(exp, SEARCH_SPACE_FILE,
                  {k: getattr(cfg.tune, k) for k in SEARCHED})
    tuner = restore_or_build(cfg, str(prepared.path), artifact, name=name, storage_path=storage,
                             grid=args.grid, max_concurrent=concurrent)
    results = tuner.fit()
    # Tune returns normally from an interrupted fit (Ctrl-C), and the trials it then stops read
    # as terminated in `results`: judge from the state it saved just before stopping them.
    unfinished = unfinished_trials(tune.ResultGrid(tune.ExperimentAnalysis(exp)), cfg.tune, args.grid)
    if unfinished:
        # No summary, no test, a non-zero exit; rerunning restores.
        cli.fail(RuntimeError(f"the experiment {exp} was interrupted with {unfinished} trial(s) unfinished; "
                              f"its state is saved: rerun the same command to resume it"), code=130)
    metric = cfg.tune.metric
    rows = trial_rows(results, metric)
    print(f"\n[tune] {len(rows)} trials, sorted by best {metric}:")
    for r in rows:
        vals = " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                        for k in SEARCHED if k in r)
        best = "-" if r["best"] is None else f"{r['best']:.4f}"
        print(f"  {r['trial_id']}  {metric} {best}  epochs {r['epochs']}  {r['seconds']:.0f} s  {vals}"
              + (f"  ERROR {r['error'][:120]}" if r["error"] else ""))
    if all(r["best"] is None for r in rows):
        raise RuntimeError("every trial failed; see the errors above")
    best = results.get_best_result(metric=metric, mode="max", scope="all", filter_nan_and_inf=True)
    summary = {"experiment": exp, "metric": metric, "grid": args.grid,
               "trials": rows, "trial_seconds": round(sum(r["seconds"] for r in rows), 1),
               "best_config": {k: best.config[k] for k in best.config},
               "best_val": max(r["best"] for r in rows if r["best"] is not None)}
    print(f"[tune] best {metric} {summary['best_val']:.4f} with {summary['best_config']}; "
          f"trial time {summary['trial_seconds']:.0f} s")
    if not args.no_test:
        baselines = [b for b in args.baselines.split(",") if b]
        summary["test"] = evaluate_best(cfg, prepared, artifact, best, baselines)
        print("\n[tune] test, full ranking:")
        for rec in summary["test"]["records"]:
            print(f"  {rec['variant']:14s} " + " ".join(f"{k} {rec['test']['full'][k]:.4f}"
                                                     for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10")))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    print(f"[tune] wrote {write_json_in(exp, TEST_RESULTS_FILE, summary)}; report: python jobs/report.py --experiment {exp}")


if __name__ == "__main__":
    cli.run_main(main)
