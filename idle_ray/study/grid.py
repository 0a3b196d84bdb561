"""The study as Ray Tune grids: ID models pre-trained by a first grid (ID model × seed), then every cell ×
seed as one trial of a second grid; each trial is a normal Ray Train run of the shared worker
(:func:`idle_ray.train.runs.pretrain`, :func:`idle_ray.train.runs.train_and_test`), so the study runs
in parallel on a cluster, shows in the Tune dashboard and restores after an interruption.

Both grids live in ``<train.storage_path>/study-<name>/`` (``pretrain-<hash>``, ``cells-<hash>``; the
hash covers the trained settings and the ``study`` section), beside the cells' Train runs (``runs/``)
and records (``records/``: one JSON per cell and seed, written after its test, per-user ranks
included). Rerunning the same command restores each grid (``Tuner.restore``): finished trials are
kept, unfinished ones resume their Train run from its last checkpoint, and a trial whose record is
already written (finished while its grid's state was not yet saved) reports it without training.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

from ray import tune

from idle_ray.config import ExperimentConfig
from idle_ray.study import cells as study_cells
from idle_ray.study.cells import COLUMNS, plan_key
from idle_ray.train import storage as run_storage
from idle_ray.tune.search import TRIAL_DRIVER_CPUS, max_concurrent_trials

RECORDS = "records"


class StudyInterrupted(RuntimeError):
    """A grid stopped with trials unfinished (Ctrl-C); its state is saved and a rerun restores it."""


def pretrain_trial(params: dict, *, plans: dict, prepared: str) -> None:
    """Tune trial: pre-train (or reuse) the ID model(s) of one (ID model, seed)."""
    from idle_ray.config import experiment_from_dict
    from idle_ray.data.prepare import load_prepared
    from idle_ray.train.runs import pretrain

    data = load_prepared(prepared)
    plan = plans[plan_key(params["id_model"], params["seed"])]
    artifacts = [pretrain(experiment_from_dict(e), data)[0] for e in plan["experiments"]]
    tune.report({"id_models": len(artifacts)})


def cell_trial(params: dict, *, plans: dict, prepared: str, records: str) -> None:
    """Tune trial: one cell for one seed, trained and tested once; its record is written to ``records``
    and its test metrics reported to Tune."""
    from idle_ray.config import experiment_from_dict
    from idle_ray.data.prepare import load_prepared
    from idle_ray.train.runs import train_and_test

    plan = plans[plan_key(params["cell"], params["seed"])]
    what = f"[study] cell {params['cell']} seed {params['seed']}"
    record = run_storage.read_json_in(records, plan["record"])
    if record is None:
        print(f"{what}: training and testing", flush=True)
        t0 = time.time()
        record = train_and_test(experiment_from_dict(plan["experiment"]), load_prepared(prepared), plan["artifact"])
        record.update(plan["about"], seconds=round(time.time() - t0, 1))
        run_storage.write_json_in(records, plan["record"], record)
    else:
        print(f"{what}: its record exists, nothing to train", flush=True)
    tune.report({f"test_{m}": record["test"]["full"][m] for m in COLUMNS})


def run_grid(fn, space: dict, *, storage: str, name: str, concurrent: int, max_failures: int, log=print) -> None:
    """Fit the grid ``space`` of the function trainable ``fn`` as experiment ``storage/name``, restoring
    it when it exists. Raises :class:`StudyInterrupted` when trials are left unfinished, RuntimeError
    when some failed (a rerun retries them)."""
    path = run_storage.join(storage, name)
    trainable = tune.with_resources(fn, {"CPU": TRIAL_DRIVER_CPUS})
    if tune.Tuner.can_restore(path):
        log(f"[study] restoring {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={k: tune.grid_search(v) for k, v in space.items()},
                           tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent,
                                                       trial_dirname_creator=lambda trial: trial.trial_id),
                           run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                                     failure_config=tune.FailureConfig(max_failures=max_failures)))
    tuner.fit()
    # Tune returns normally from an interrupted fit: judge from the state it saved before stopping.
    saved = tune.ResultGrid(tune.ExperimentAnalysis(path))
    expected = math.prod(len(v) for v in space.values())
    unfinished = len(saved) - saved.num_terminated - saved.num_errors + max(0, expected - len(saved))
    if unfinished:
        raise StudyInterrupted(f"the grid {path} was interrupted with {unfinished} trial(s) unfinished; its state "
                               f"is saved: rerun the same command to continue it")
    if saved.num_errors:
        first = next(r.error for r in saved if r.error)
        raise RuntimeError(f"{saved.num_errors} trial(s) of {path} failed (first: {first!r}); rerun the same "
                           f"command to retry them")


def concurrency(cfg: ExperimentConfig, trials: int, pretraining: bool) -> int:
    """Trials at once: ``tune.max_concurrent_trials`` or what the cluster may grow to (each trial needs
    its Train workers: the pre-training ones in the first grid), as for a search."""
    from idle_ray.tune.capacity import cluster_max_resources
    train = cfg.train
    if pretraining:
        p = cfg.pretrain
        train = dataclasses.replace(train, num_workers=p.num_workers, cpus_per_worker=p.cpus_per_worker, use_gpu=False)
    return max_concurrent_trials(dataclasses.replace(cfg, train=train, tune=dataclasses.replace(
        cfg.tune, num_samples=trials)), cluster_max_resources()[0])


def figure4_data(cfg: ExperimentConfig, prepared, plans: dict, records: dict, log=print) -> dict | None:
    """Figure 4's series (:func:`idle_ray.study.representations.cell_representation_map`) of its cell's
    first seed, from that cell's ID model and selected adapter weights; None without an IDLE row."""
    from idle_ray.config import experiment_from_dict
    from idle_ray.study.representations import cell_representation_map
    from idle_ray.train import builders
    from idle_ray.train.weights import run_best_weights

    cell = study_cells.figure4_cell(cfg)
    if cell is None:
        return None
    t0 = time.time()
    key = plan_key(cell.key, cfg.study.seeds[0])
    plan, record = plans[key], records[key]
    c = experiment_from_dict(plan["experiment"])
    builders.prepare_backbone(c, log=log)
    weights = run_best_weights(c.train.storage_path, record["run"])
    fig4 = cell_representation_map(c, prepared, plan["artifact"], weights)
    fig4.update(cell=cell.key, seed=cfg.study.seeds[0], weights=weights, seconds=round(time.time() - t0, 1))
    log(f"[study] Figure 4 from {cell.key} seed {cfg.study.seeds[0]}: MMD² adapter tokens vs title tokens "
        f"{fig4['mmd']['before']:.4f} before, {fig4['mmd']['after']:.4f} after training ({fig4['seconds']} s)")
    return fig4


def run_study(cfg: ExperimentConfig, log=print) -> dict:
    """Prepare the data, run both grids, gather every record, write ``<study.out_dir>/<name>/``;
    returns the results (:func:`idle_ray.study.outputs.study_results`)."""
    from idle_ray.data.prepare import format_summary
    from idle_ray.study.outputs import data_summary, study_results, write_outputs
    from idle_ray.train import builders
    from idle_ray.train.launch import check_storage, ensure_ray

    t0 = time.time()
    prepared = builders.prepare_from_config(cfg, log=log)
    log(format_summary(prepared))
    ensure_ray()
    check_storage(cfg.train.storage_path, cfg.train.num_workers)
    work = study_cells.work_dir(cfg)
    runs, records = run_storage.join(work, "runs"), run_storage.join(work, RECORDS)
    artifacts = study_cells.artifacts_root(cfg)
    h = study_cells.study_hash(cfg)
    data = str(prepared.path)
    # Figure 2's backbones: each cache built here, once, before any trial; a missing package fails now
    for cells in study_cells.figure2_cells(cfg).values():
        builders.prepare_backbone(study_cells.cell_config(cfg, next(iter(cells.values())), cfg.seed, "", ""), log=log)
    pre = study_cells.pretrain_plans(cfg, prepared, artifacts, runs)
    models = list(dict.fromkeys(k.split("|")[0] for k in pre))
    log(f"[study] {work}: ID models {', '.join(models)} x seeds {cfg.study.seeds}")
    run_grid(tune.with_parameters(pretrain_trial, plans=pre, prepared=data),
             {"id_model": models, "seed": list(cfg.study.seeds)}, storage=work, name=f"pretrain-{h}",
             concurrent=concurrency(cfg, len(pre), True), max_failures=cfg.train.max_failures, log=log)
    plans = study_cells.cell_plans(cfg, prepared, artifacts, runs)
    keys = [c.key for c in study_cells.all_cells(cfg)]
    log(f"[study] {len(keys)} cells x {len(cfg.study.seeds)} seeds = {len(plans)} trials")
    run_grid(tune.with_parameters(cell_trial, plans=plans, prepared=data, records=records),
             {"cell": keys, "seed": list(cfg.study.seeds)}, storage=work, name=f"cells-{h}",
             concurrent=concurrency(cfg, len(plans), False), max_failures=cfg.train.max_failures, log=log)
    found = {k: run_storage.read_json_in(records, p["record"]) for k, p in plans.items()}
    missing = [k for k, r in found.items() if r is None]
    if missing:
        raise RuntimeError(f"the grid finished but {len(missing)} record(s) are missing in {records}: {missing[:5]}")
    fig4 = figure4_data(cfg, prepared, plans, found, log)
    results = study_results(cfg, data_summary(prepared.manifest), list(found.values()), wall_seconds=time.time() - t0,
                            fig4=fig4)
    out = os.path.join(cfg.study.out_dir, cfg.name)
    write_outputs(results, out, log=log)
    return results
