"""Ray Tune over the adapter's hyperparameters (Train V2 style).

Each Tune trial runs :func:`train_driver_fn`, a Tune function trainable that launches one Ray
Train run (the same ``train_fn_per_worker`` as ``jobs/train.py``, house rule 5) with
``TuneReportCallback``: every epoch's validation metrics reach Tune, where ``OptunaSearch`` (TPE,
seeded) proposes the next configuration and ASHA stops weak trials on ``tune.metric``.

Searched: prompt length k (``adapter.prompt_length``), projection width w
(``adapter.projection_width``), MMD weight lambda (``adapter.mmd_weight``, log scale) and the
learning rate (``train.lr``, log scale); ranges come from the ``tune:`` section of the config.

A trial's Train run is named ``<experiment>-<trial id>`` under ``train.storage_path``, so a trial
that is restarted (``Tuner.restore`` after the driver died) resumes its Train run from the last
checkpoint instead of starting over.
"""
from __future__ import annotations

import dataclasses
import json
import math

from ray import tune

from idle_ray.config import ExperimentConfig, TuneConfig
from idle_ray.train import storage

SEARCHED = ("prompt_length", "projection_width", "mmd_weight", "lr")
LOG_SCALE = ("mmd_weight", "lr")
# Written by jobs/tune.py into the experiment folder, read by jobs/report.py.
SEARCH_SPACE_FILE = "search_space.json"
TEST_RESULTS_FILE = "test_results.json"
# The Tune function only drives the Train run (its workers hold the real resources); it still
# needs a slice of a CPU to be scheduled.
TRIAL_DRIVER_CPUS = 0.1
# Kept free per trial for its Ray Data read/map tasks (0.1 CPU each): Train's workers only
# start once all fit, but a feed that cannot schedule hangs the run silently.
DATA_CPUS_PER_TRIAL = 0.2


def search_space(t: TuneConfig) -> dict:
    """The ``param_space`` for OptunaSearch (TPE)."""
    return {
        "prompt_length": tune.randint(int(t.prompt_length[0]), int(t.prompt_length[1]) + 1),
        "projection_width": tune.choice([int(w) for w in t.projection_width]),
        "mmd_weight": tune.loguniform(float(t.mmd_weight[0]), float(t.mmd_weight[1])),
        "lr": tune.loguniform(float(t.lr[0]), float(t.lr[1])),
    }


def grid_space(t: TuneConfig) -> dict:
    """A full grid over ``tune.grid`` (benchmark baseline); unlisted fields keep the config's value."""
    if not t.grid:
        raise ValueError("tune.grid is empty: give values per field, e.g. --set 'tune.grid={lr: [0.001, 0.003]}'")
    return {k: tune.grid_search(list(v)) for k, v in t.grid.items()}


def expected_trials(t: TuneConfig, grid: bool) -> int:
    """How many trials a finished experiment holds: every grid point, or ``tune.num_samples``."""
    return math.prod(len(v) for v in t.grid.values()) if grid else t.num_samples


def unfinished_trials(results, t: TuneConfig, grid: bool) -> int:
    """Trials of ``results`` (a ``ResultGrid``) neither terminated nor errored, plus those never
    started. Read it from the saved experiment state (``ResultGrid(ExperimentAnalysis(path))``):
    after an interrupted ``fit`` (Ctrl-C), which Tune returns from normally, the returned grid
    marks the trials it stopped as terminated, while the state saved before stopping them (the
    one ``Tuner.restore`` resumes) does not."""
    started = len(results)
    return (started - results.num_terminated - results.num_errors) + max(0, expected_trials(t, grid) - started)


def apply_params(cfg: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The trial's experiment: the base config with the sampled values written in."""
    a = {k: params[k] for k in ("prompt_length", "projection_width", "mmd_weight") if k in params}
    if "prompt_length" in a:
        a["prompt_length"] = int(a["prompt_length"])
    if "projection_width" in a:
        a["projection_width"] = int(a["projection_width"])
    tr = {"lr": float(params["lr"])} if "lr" in params else {}
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, **a),
                               train=dataclasses.replace(cfg.train, **tr))


def trial_resources(cfg: ExperimentConfig) -> dict:
    """What one trial holds while it trains: its Train workers (the driver's slice aside)."""
    tr = cfg.train
    out = {"CPU": tr.num_workers * tr.cpus_per_worker}
    if tr.use_gpu:
        out["GPU"] = float(tr.num_workers)
    return out


def max_concurrent_trials(cfg: ExperimentConfig, cluster: dict) -> int:
    """``tune.max_concurrent_trials``, or as many trials as ``cluster`` holds at once (at most
    ``tune.num_samples``, at least 1).

    ``cluster``: the resources the cluster may grow to (:func:`idle_ray.tune.capacity.cluster_max_resources`),
    not the ones it has now: on an autoscaling cluster the trials' pending Train workers are what
    make the autoscaler add nodes. A Train run starts only when all its workers fit, so more trials
    than that only queue drivers.
    """
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    need = trial_resources(cfg)
    per_trial = need["CPU"] + TRIAL_DRIVER_CPUS + DATA_CPUS_PER_TRIAL
    fits = [float(cluster.get("CPU", 0)) / per_trial]
    if "GPU" in need:
        fits.append(float(cluster.get("GPU", 0)) / need["GPU"])
    return max(1, math.floor(min(*fits, cfg.tune.num_samples) + 1e-9))


def train_run_name(experiment: str, trial_id: str) -> str:
    return f"{experiment}-{trial_id}"


def train_driver_fn(params: dict, *, experiment: dict, prepared: str, id_artifact: str, name: str) -> None:
    """Tune function trainable: one Ray Train run of the adapter with this trial's values.

    ``params`` holds the sampled values; the rest is bound with ``tune.with_parameters``.
    Metrics reach Tune through ``TuneReportCallback`` (one report per epoch, with the
    checkpoint path); ASHA stopping the trial stops this function and its Train run.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from idle_ray.config import experiment_from_dict
    from idle_ray.data.prepare import load_prepared
    from idle_ray.train.launch import run_training

    cfg = apply_params(experiment_from_dict(experiment), params)
    run_name = train_run_name(name, tune.get_context().get_trial_id())
    # A trial restarted by Tuner.restore (the driver died) resumes its Train run from the last
    # checkpoint, but Tune restarts this function with an empty result log: report the epochs
    # already trained first, so ASHA and the result files see every epoch exactly once.
    for metrics in trained_epochs(storage.join(cfg.train.storage_path, run_name)):
        tune.report(metrics)
    class EpochReportCallback(TuneReportCallback):
        """Forwards epoch reports only: a step checkpoint (``train.checkpoint_every_steps``) has no
        validation metrics, and Tune's scheduler and result files count epochs."""

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics[0].get("step_checkpoint"):
                super().after_report(run_context, metrics, checkpoint)

    result = run_training(cfg, load_prepared(prepared), task="adapter", run_name=run_name,
                          id_artifact=id_artifact, extra_callbacks=[EpochReportCallback()])
    if result.error:
        raise result.error


def trained_epochs(run_dir: str) -> list[dict]:
    """The per-epoch metrics of the checkpoint the Train run resumes from (the one Ray Train
    registered last, as the worker picks it), oldest first; the last one carries the checkpoint's
    location like ``TuneReportCallback`` does. Empty when the run starts from scratch.

    Not the newest folder on disk: a driver killed between a checkpoint's upload and its
    registration leaves a folder the run does not resume from, and its epoch is trained (and
    reported) again."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from idle_ray.train.checkpoints import resume_state
    found = resume_state(run_dir)
    if found is None:
        return []
    location, state = found
    history = list(state.get("history") or [])
    if history:
        history[-1] = {**history[-1], CHECKPOINT_PATH_KEY: storage.resolve(location)[1]}
    return history


def trainable(cfg: ExperimentConfig, prepared: str, id_artifact: str, name: str):
    """``train_driver_fn`` bound to this experiment, with the driver's small resource request."""
    from idle_ray.config import to_dict
    fn = tune.with_parameters(train_driver_fn, experiment=to_dict(cfg), prepared=str(prepared),
                              id_artifact=str(id_artifact), name=name)
    return tune.with_resources(fn, {"CPU": TRIAL_DRIVER_CPUS})


def build_tuner(cfg: ExperimentConfig, prepared: str, id_artifact: str, *, name: str, storage_path: str,
                grid: bool = False, max_concurrent: int = 1):
    """A fresh ``Tuner``: OptunaSearch (seeded TPE) + ASHA, or a full grid (benchmark baseline)."""
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    t = cfg.tune
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor)
    if grid:
        search_alg, space, samples = None, grid_space(t), 1
        scheduler = None  # the baseline trains every grid point fully
    else:
        sampler = TPESampler(seed=cfg.seed, n_startup_trials=t.random_trials)
        search_alg, space, samples = OptunaSearch(sampler=sampler), search_space(t), t.num_samples
    return tune.Tuner(
        trainable(cfg, prepared, id_artifact, name),
        param_space=space,
        tune_config=tune.TuneConfig(metric=t.metric, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=samples, max_concurrent_trials=max_concurrent,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                  failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
                                  verbose=1),
    )


def restore_or_build(cfg: ExperimentConfig, prepared: str, id_artifact: str, *, name: str, storage_path: str,
                     grid: bool = False, max_concurrent: int = 1, log=print):
    """Resume the experiment ``name`` when its folder exists (unfinished and errored trials
    continue, finished ones are kept), else start it."""
    path = storage.join(storage_path, name)
    if tune.Tuner.can_restore(path):
        log(f"[tune] restoring {path}")
        return tune.Tuner.restore(path, trainable=trainable(cfg, prepared, id_artifact, name),
                                  resume_unfinished=True, resume_errored=True)
    return build_tuner(cfg, prepared, id_artifact, name=name, storage_path=storage_path, grid=grid,
                       max_concurrent=max_concurrent)
