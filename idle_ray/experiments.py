"""The main experiment (``jobs/main.py``): the ID model, then each adapter variant, tested once and reported.

Layer: above ``train`` (it runs training) and beside ``tune``; tables, plots and result files come
from :mod:`idle_ray.results`, so a record per (variant, seed) is all this flow makes.
"""
from __future__ import annotations

import dataclasses
import os
import time

from idle_ray.config import ExperimentConfig, config_hash
from idle_ray.results.files import write_json, write_text
from idle_ray.results.plots import bar_plot
from idle_ray.results.records import by_variant
from idle_ray.results.tables import metrics_table

COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")
LABELS = {"id_only": "SASRec (ID only)", "llm_only": "LLM-only", "idle": "IDLE-Adapter"}
VARIANTS = ("id_only", "llm_only", "idle")


def with_variant(cfg: ExperimentConfig, variant: str) -> ExperimentConfig:
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, variant=variant))


def run_main_job(cfg: ExperimentConfig, out: str, variants=VARIANTS, log=print) -> list[dict]:
    """Prepare, pre-train the ID model, train and test each of ``variants`` once (``cfg.seed``), write
    ``out/results.{md,json,png}``; returns the records (one per variant)."""
    from idle_ray.data.prepare import format_summary
    from idle_ray.train import builders
    from idle_ray.train.runs import pretrain, train_and_test

    t0 = time.time()
    prepared = builders.prepare_from_config(cfg)
    log(format_summary(prepared))
    artifact, _ = pretrain(cfg, prepared, log=log)
    log(f"[main] SASRec ready ({time.time() - t0:.0f} s)")
    records = []
    for variant in variants:
        t = time.time()
        rec = train_and_test(with_variant(cfg, variant), prepared, artifact, log=log)
        rec["seconds"] = round(time.time() - t, 1)
        records.append(rec)
        log(f"[main] {variant} done in {rec['seconds']:.0f} s: " +
            " ".join(f"{c} {rec['test']['full'][c]:.4f}" for c in COLUMNS))
    total = time.time() - t0
    title = (f"MovieLens-100K test, full ranking over {prepared.num_items:,} items, {prepared.manifest['num_users']} "
             f"users; backbone {cfg.llm.backbone}; seed {cfg.seed}")
    rows = by_variant(records, LABELS)
    table = metrics_table(rows, COLUMNS, title)
    log("\n" + table + f"\n\nwall time {total / 60:.1f} min")
    write_text(os.path.join(out, "results.md"), table + f"\n\nconfig hash {config_hash(cfg)}, data fingerprint "
               f"{prepared.fingerprint[:12]}, wall time {total / 60:.1f} min\n")
    write_json(os.path.join(out, "results.json"), {"config_hash": config_hash(cfg), "seed": cfg.seed,
                                                   "data_fingerprint": prepared.fingerprint,
                                                   "wall_seconds": round(total, 1), "records": records})
    bar_plot(rows, COLUMNS, os.path.join(out, "results.png"), title)
    log(f"[main] wrote {out}/results.md, results.json, results.png")
    return records
