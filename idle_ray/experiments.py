"""The main experiment (``jobs/main.py``): ID models, then each adapter variant, per seed, tested once and reported.

Layer: above ``train`` (it runs training) and beside ``tune``; tables, plots, intervals and result
files come from :mod:`idle_ray.results`, so a record per (row, seed) is all this flow makes.

Rows (``variants``): ``id_only_all`` — the ID model pre-trained on every training target (the
strongest ID baseline); ``id_only`` — the adapter's own base, pre-trained without each user's last
``pretrain.holdout_targets`` training targets (out-of-sample states for the adapter, DESIGN §5c);
``llm_only``, ``llara``, ``idle``; ``idle_refit`` — the same trained adapter tested on its base
fine-tuned on every training target from the held-out weights (``pretrain.refit_epochs``; its
validation on every user is recorded beside the base's, so validation decides which to use); and the ablations ``idle_no_fusion`` (the paper's head, no score
fusion), ``idle_no_refine``, ``idle_no_mmd``. The comparison is IDLE against the best baseline row
(by mean over seeds), per user and paired: a bootstrap interval of the mean difference with each
user's metric averaged over the seeds.
"""
from __future__ import annotations

import dataclasses
import os
import time

from idle_ray.config import ConfigError, ExperimentConfig, config_hash
from idle_ray.results.comparison import comparison_table as results_comparison_table
from idle_ray.results.comparison import versus_best_baseline
from idle_ray.results.files import write_json, write_text
from idle_ray.results.plots import bar_plot
from idle_ray.results.tables import metrics_table

COLUMNS = ("hr@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10", "mrr")
COMPARED = ("hr@5", "ndcg@5")
# row -> (adapter.variant, adapter overrides, label)
ROWS = {"id_only_all": ("id_only", {}, "ID model (all targets)"),
        "id_only": ("id_only", {}, "ID model (adapter's base)"),
        "llm_only": ("llm_only", {}, "LLM-only"),
        "llara": ("llara", {}, "LLaRA-style"),
        "idle": ("idle", {}, "IDLE-Adapter"),
        "idle_unanchored": ("idle", {"anchor_weight": 0.0}, "IDLE-Adapter on its base (no anchor)"),
        "idle_refit": ("idle", {"anchor_weight": 0.0}, "IDLE-Adapter, refit base"),
        "idle_no_fusion": ("idle", {"fusion": "none"}, "IDLE w/o fusion"),
        "idle_no_refine": ("idle_no_refine", {}, "IDLE w/o refinement"),
        "idle_no_mmd": ("idle_no_mmd", {}, "IDLE w/o MMD")}
BASELINES = ("id_only_all", "id_only", "llm_only", "llara")
# make run's rows (the 30-minute budget on 2 cores); LLM-only (~13 min there) and the rest via --variants
DEFAULT_ROWS = ("id_only_all", "id_only", "idle")


def row_config(cfg: ExperimentConfig, row: str) -> ExperimentConfig:
    variant, overrides, _ = ROWS[row]
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, variant=variant, **overrides))


def row_label(cfg: ExperimentConfig, row: str) -> str:
    """The row's name in tables; an anchored adapter says so, with its weight."""
    from idle_ray.train.builders import uses_anchor
    rc = row_config(cfg, row)
    return ROWS[row][2] + (f" (anchored, a={rc.adapter.anchor_weight:g})" if uses_anchor(rc) else "")


def _labels(records: list[dict]) -> dict[str, str]:
    return {r["row"]: r.get("label") or ROWS[r["row"]][2] for r in records}


def run_seed(cfg: ExperimentConfig, prepared, rows, log=print) -> list[dict]:
    """Every row for ``cfg.seed``: pre-train the ID model(s) (reused when present), train and test each."""
    from idle_ray.train import builders
    from idle_ray.train.runs import pretrain, train_and_test

    t0 = time.time()
    artifact, _ = pretrain(cfg, prepared, log=log)
    artifact_all = artifact_refit = artifact
    anchored = any(builders.uses_anchor(row_config(cfg, row)) for row in rows)
    if ("id_only_all" in rows or anchored) and cfg.pretrain.holdout_targets:
        artifact_all, _ = pretrain(builders.all_targets_config(cfg), prepared, log=log)
    if "idle_refit" in rows:
        if not cfg.pretrain.holdout_targets:
            raise ConfigError("row idle_refit refits the adapter's held-out base: set pretrain.holdout_targets > 0")
        cfg_refit = builders.sibling_artifact(dataclasses.replace(cfg, pretrain=dataclasses.replace(
            cfg.pretrain, holdout_targets=0, init_artifact=artifact, epochs=cfg.pretrain.refit_epochs)),
            f"refit{cfg.pretrain.refit_epochs}")
        artifact_refit, _ = pretrain(cfg_refit, prepared, log=log)
    log(f"[main] seed {cfg.seed}: ID model(s) ready ({time.time() - t0:.0f} s)")
    records, trained = [], {}  # idle, idle_unanchored and idle_refit: one adapter run, trained once
    for row in rows:
        t = time.time()
        rec = train_and_test(row_config(cfg, row), prepared, artifact_all if row == "id_only_all" else artifact,
                             test_artifact=artifact_refit if row == "idle_refit" else None, log=log,
                             trained=trained)
        rec.update(row=row, label=row_label(cfg, row), seconds=round(time.time() - t, 1))
        records.append(rec)
        log(f"[main] seed {cfg.seed} {row} done in {rec['seconds']:.0f} s: " +
            " ".join(f"{c} {rec['test']['full'][c]:.4f}" for c in COLUMNS))
    return records


def comparison(records: list[dict], resamples: int = 10_000) -> list[dict]:
    """IDLE minus the best baseline row on each of ``COMPARED``: ratio of means and a paired bootstrap."""
    return versus_best_baseline(records, ("idle", "idle_unanchored", "idle_refit"), BASELINES, COMPARED, resamples)


def comparison_table(rows: list[dict], labels: dict[str, str] | None = None) -> str:
    return results_comparison_table(rows, {**{k: v[2] for k, v in ROWS.items()}, **(labels or {})})


def run_main_job(cfg: ExperimentConfig, out: str, seeds=None, rows=DEFAULT_ROWS, log=print) -> list[dict]:
    """Prepare, then per seed pre-train the ID model(s) and train and test each row once; write
    ``out/results.{md,json,png}`` (mean ± std over seeds, IDLE vs the best baseline); returns the records."""
    from idle_ray.data.prepare import format_summary
    from idle_ray.train import builders

    seeds = list(seeds or [cfg.seed])
    t0 = time.time()
    prepared = builders.prepare_from_config(cfg)
    log(format_summary(prepared))
    records = [rec for seed in seeds for rec in run_seed(dataclasses.replace(cfg, seed=seed), prepared, rows, log)]
    write_results(cfg, prepared, records, rows, seeds, out, time.time() - t0, log)
    return records


def write_results(cfg: ExperimentConfig, prepared, records: list[dict], rows, seeds, out: str, total: float,
                  log=print) -> None:
    """The table (mean ± std over seeds), IDLE vs the best baseline, ``out/results.{md,json,png}``."""
    title = (f"{prepared.manifest['dataset']} test, full ranking over {prepared.num_items:,} items, "
             f"{prepared.manifest['num_users']} users; backbone {cfg.llm.backbone}; seeds "
             f"{', '.join(map(str, seeds))}")
    labels = _labels(records)
    table = metrics_table({labels[row]: [r["test"]["full"] for r in records if r["row"] == row] for row in rows},
                          COLUMNS, title)
    compared = comparison(records)
    text = table + ("\n\n" + comparison_table(compared, labels) if compared else "")
    log("\n" + text + f"\n\nwall time {total / 60:.1f} min")
    write_text(os.path.join(out, "results.md"), text + f"\n\nconfig hash {config_hash(cfg)}, data fingerprint "
               f"{prepared.fingerprint[:12]}, wall time {total / 60:.1f} min\n")
    write_json(os.path.join(out, "results.json"), {"config_hash": config_hash(cfg), "seeds": list(seeds),
                                                   "data_fingerprint": prepared.fingerprint,
                                                   "wall_seconds": round(total, 1), "comparison": compared,
                                                   "records": records})
    bar_plot({labels[row]: [r["test"]["full"] for r in records if r["row"] == row] for row in rows},
             COLUMNS, os.path.join(out, "results.png"), title)
    log(f"[main] wrote {out}/results.md, results.json, results.png")


def merge_results(cfg: ExperimentConfig, paths: list[str], out: str, log=print) -> list[dict]:
    """Tables from saved ``results.json`` files (e.g. seeds run as separate jobs), without training:
    their records (per-user ranks included) pooled, one seed once. The files must come from
    ``cfg`` (same config hash) and the same data."""
    import json

    from idle_ray.train import builders
    prepared = builders.prepare_from_config(cfg, log=lambda *a: None)
    records, seen, total = [], set(), 0.0
    for path in paths:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--from-results: cannot read {path} ({e})") from None
        if saved.get("config_hash") != config_hash(cfg) or saved.get("data_fingerprint") != prepared.fingerprint:
            raise ConfigError(f"--from-results: {path} comes from another config or data (config hash "
                              f"{saved.get('config_hash')}, this config's {config_hash(cfg)}): pass the --config "
                              f"and --set that produced it")
        for rec in saved["records"]:
            key = (rec["row"], rec["seed"])
            if key in seen:
                raise ConfigError(f"--from-results: row {rec['row']!r} seed {rec['seed']} appears twice (again in {path})")
            seen.add(key)
            records.append(rec)
        total += float(saved.get("wall_seconds", 0.0))
    rows = list(dict.fromkeys(r["row"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    write_results(cfg, prepared, records, rows, seeds, out, total, log)
    return records
