"""A Tune experiment as ``jobs/tune.py`` runs it: its name and folder, the search, its summary, and the
best trial tested once next to the baselines."""
from __future__ import annotations

import dataclasses
import os
import time

from idle_ray.config import ConfigError, ExperimentConfig, config_hash
from idle_ray.train import storage as run_storage
from idle_ray.tune.search import SEARCH_SPACE_FILE, SEARCHED, TEST_RESULTS_FILE

TEST_COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")


class SearchInterrupted(RuntimeError):
    """The search stopped with trials unfinished (Ctrl-C); its state is saved and a rerun restores it."""


def experiment_name(cfg: ExperimentConfig, grid: bool) -> str:
    return f"{cfg.name}-{'grid' if grid else 'search'}-{config_hash(cfg)[:8]}"


def experiment_location(cfg: ExperimentConfig, grid: bool) -> tuple[ExperimentConfig, str]:
    """``(cfg, folder)``: the config as the trials get it (``train.storage_path`` resolved here:
    trials run in other processes and folders) and the experiment folder, whose name hashes that
    config. Anything that looks for an experiment by its config (the benchmark) calls this too."""
    storage = run_storage.absolute(cfg.train.storage_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=storage))
    return cfg, run_storage.join(storage, experiment_name(cfg, grid))


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


def evaluate_best(cfg: ExperimentConfig, prepared, artifact: str, best, baselines: list[str], log=print) -> dict:
    """The best trial's validation-selected adapter on test, once, next to the baselines."""
    from idle_ray.train.checkpoints import CKPT_WEIGHTS
    from idle_ray.train.evaluate import evaluate_adapter
    from idle_ray.train.runs import train_and_test
    from idle_ray.tune.search import apply_params

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
        records.append(train_and_test(base, prepared, artifact, log=log))
    return {"weights": weights, "records": records}


def run_search(cfg: ExperimentConfig, grid: bool = False, baselines: list[str] = (), test: bool = True,
               log=print) -> dict:
    """Prepare, pre-train the ID model, search (or run the grid), then test the best trial once;
    writes and returns the summary (``TEST_RESULTS_FILE`` in the experiment folder). Rerunning
    restores an interrupted search; raises :class:`SearchInterrupted` if this one was interrupted."""
    from ray import tune

    from idle_ray.data.prepare import format_summary
    from idle_ray.train import builders
    from idle_ray.train.launch import check_storage, ensure_ray
    from idle_ray.train.runs import pretrain
    from idle_ray.tune.capacity import cluster_max_resources
    from idle_ray.tune.search import max_concurrent_trials, restore_or_build, unfinished_trials

    if grid and not cfg.tune.grid:
        raise ConfigError("--grid needs tune.grid in the config: values per field, e.g. "
                          "tune.grid: {prompt_length: [2, 8], lr: [0.001, 0.003]}")
    t0 = time.time()
    prepared = builders.prepare_from_config(cfg)
    log(format_summary(prepared))
    artifact, _ = pretrain(cfg, prepared, log=log)
    ensure_ray()
    check_storage(cfg.train.storage_path, cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu)
    cfg, exp = experiment_location(cfg, grid)
    storage, name = cfg.train.storage_path, experiment_name(cfg, grid)
    most, source = cluster_max_resources()
    concurrent = max_concurrent_trials(cfg, most)
    sized = "tune.max_concurrent_trials" if cfg.tune.max_concurrent_trials else \
        f"the cluster's maximum size, CPU {most.get('CPU', 0):g} GPU {most.get('GPU', 0):g}, from {source}"
    log(f"[tune] experiment {exp}: {concurrent} trial(s) at once ({sized})")
    # The declared space, so the report's importances use the real ranges (not the values seen).
    run_storage.write_json_in(exp, SEARCH_SPACE_FILE, {k: getattr(cfg.tune, k) for k in SEARCHED})
    tuner = restore_or_build(cfg, str(prepared.path), artifact, name=name, storage_path=storage,
                             grid=grid, max_concurrent=concurrent)
    results = tuner.fit()
    # Tune returns normally from an interrupted fit (Ctrl-C), and the trials it then stops read
    # as terminated in `results`: judge from the state it saved just before stopping them.
    unfinished = unfinished_trials(tune.ResultGrid(tune.ExperimentAnalysis(exp)), cfg.tune, grid)
    if unfinished:
        # No summary, no test; rerunning restores.
        raise SearchInterrupted(f"the experiment {exp} was interrupted with {unfinished} trial(s) unfinished; "
                                f"its state is saved: rerun the same command to resume it")
    metric = cfg.tune.metric
    rows = trial_rows(results, metric)
    log(f"\n[tune] {len(rows)} trials, sorted by best {metric}:")
    for r in rows:
        vals = " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                        for k in SEARCHED if k in r)
        best = "-" if r["best"] is None else f"{r['best']:.4f}"
        log(f"  {r['trial_id']}  {metric} {best}  epochs {r['epochs']}  {r['seconds']:.0f} s  {vals}"
            + (f"  ERROR {r['error'][:120]}" if r["error"] else ""))
    if all(r["best"] is None for r in rows):
        raise RuntimeError("every trial failed; see the errors above")
    best = results.get_best_result(metric=metric, mode="max", scope="all", filter_nan_and_inf=True)
    summary = {"experiment": exp, "metric": metric, "grid": grid,
               "trials": rows, "trial_seconds": round(sum(r["seconds"] for r in rows), 1),
               "best_config": {k: best.config[k] for k in best.config},
               "best_val": max(r["best"] for r in rows if r["best"] is not None)}
    log(f"[tune] best {metric} {summary['best_val']:.4f} with {summary['best_config']}; "
        f"trial time {summary['trial_seconds']:.0f} s")
    if test:
        summary["test"] = evaluate_best(cfg, prepared, artifact, best, list(baselines), log=log)
        log("\n[tune] test, full ranking:")
        for rec in summary["test"]["records"]:
            log(f"  {rec['variant']:14s} " + " ".join(f"{k} {rec['test']['full'][k]:.4f}" for k in TEST_COLUMNS))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    written = run_storage.write_json_in(exp, TEST_RESULTS_FILE, summary)
    log(f"[tune] wrote {written}; report: python jobs/report.py --experiment {exp}")
    return summary
