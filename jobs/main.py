"""The main job: MovieLens-100K end to end on local Ray (or a cluster).

prepare MovieLens-100K -> pre-train SASRec -> train IDLE-Adapter on SmolLM2-135M (real weights)
under Ray Train + DeepSpeed -> train the LLM-only baseline the same way -> evaluate all on test
once -> print a table (HR@5, NDCG@5, HR@10, NDCG@10) and write it as Markdown + JSON + PNG.

    python jobs/main.py --config configs/main_ml100k.yaml          (make run)
    ray job submit --working-dir . -- python jobs/main.py --config configs/main_ml100k.yaml
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.config import config_hash  # noqa: E402

COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")
LABELS = {"id_only_all": "ID model (all targets)", "id_only": "ID model (adapter's base)", "llm_only": "LLM-only",
          "llara": "LLaRA-style", "idle": "IDLE-Adapter", "idle_no_fusion": "IDLE w/o fusion",
          "idle_no_refine": "IDLE w/o refinement", "idle_no_mmd": "IDLE w/o MMD"}


def by_row(records: list[dict]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in records:
        rows.setdefault(r.get("row", r["variant"]), []).append(r)
    return rows


def render(records: list[dict], title: str) -> str:
    """One row per model: the test metric's mean ± std over seeds (just the value for one seed)."""
    import numpy as np
    lines = [f"### {title}", "", "| model | seeds | " + " | ".join(c.upper() for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for row, recs in by_row(records).items():
        cells = []
        for c in COLUMNS:
            v = np.array([r["test"]["full"][c] for r in recs])
            cells.append(f"{v.mean():.4f}" + (f" ± {v.std(ddof=1):.4f}" if len(v) > 1 else ""))
        lines.append(f"| {LABELS.get(row, row)} | {len(recs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from idle_ray.train.report import _atomic_write
    rows = by_row(records)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(rows)
    x = np.arange(len(COLUMNS))
    for i, (row, recs) in enumerate(rows.items()):
        vals = np.array([[r["test"]["full"][c] for c in COLUMNS] for r in recs])
        ax.bar(x + i * width, vals.mean(0), width, yerr=vals.std(0, ddof=1) if len(recs) > 1 else None,
               label=LABELS.get(row, row))
    ax.set_xticks(x + width * (len(rows) - 1) / 2, [c.upper() for c in COLUMNS])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


# row name -> (adapter.variant, adapter overrides); "id_only_all" is the ID model pre-trained on every
# training target (no hold-out), the strongest ID baseline; "id_only" is the adapter's own base.
VARIANTS = {"id_only_all": ("id_only", {}), "id_only": ("id_only", {}), "llm_only": ("llm_only", {}),
            "llara": ("llara", {}), "idle": ("idle", {}), "idle_no_fusion": ("idle", {"fusion": "none"}),
            "idle_no_refine": ("idle_no_refine", {}), "idle_no_mmd": ("idle_no_mmd", {})}
DEFAULT_VARIANTS = "id_only_all,id_only,llm_only,idle"


def run_seed(cfg, seed: int, variants: list[str], log=print) -> list[dict]:
    """Every requested row for one seed: pre-train the ID model(s), train and test each variant."""
    from idle_ray.train import builders
    from jobs.pretrain import pretrain
    from jobs.train import train_and_test

    cfg = dataclasses.replace(cfg, seed=seed)
    prepared = builders.prepare_from_config(cfg)
    t0 = time.time()
    artifact, _ = pretrain(cfg, prepared)
    artifact_all = artifact
    if "id_only_all" in variants and cfg.pretrain.holdout_targets:
        cfg_all = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, holdout_targets=0))
        artifact_all, _ = pretrain(cfg_all, prepared)
    log(f"[main] seed {seed}: ID model(s) ready ({time.time() - t0:.0f} s)")
    records = []
    for row in variants:
        variant, overrides = VARIANTS[row]
        vcfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, variant=variant, **overrides))
        t = time.time()
        rec = train_and_test(vcfg, prepared, artifact_all if row == "id_only_all" else artifact)
        rec.update(row=row, seconds=round(time.time() - t, 1))
        records.append(rec)
        log(f"[main] seed {seed} {row} done in {rec['seconds']:.0f} s: " +
            " ".join(f"{c} {rec['test']['full'][c]:.4f}" for c in COLUMNS))
    return records


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="results/main", help="folder for results.{md,json,png}")
    p.add_argument("--seeds", default="", help="comma list of seeds (default: the config's seed)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of rows, from {', '.join(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    args, cfg = cli.parse(p, argv)
    from idle_ray.config import ConfigError
    from idle_ray.data.prepare import format_summary
    from idle_ray.train import builders
    from idle_ray.train.report import write_json, write_text

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [cfg.seed]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        cli.fail(ConfigError(f"--variants: unknown row(s) {unknown}; choose from {', '.join(VARIANTS)}"))
    t0 = time.time()
    prepared = builders.prepare_from_config(cfg)
    print(format_summary(prepared), flush=True)
    records = [rec for seed in seeds for rec in run_seed(cfg, seed, variants)]
    total = time.time() - t0
    title = (f"MovieLens-100K test, full ranking over {prepared.num_items:,} items, {prepared.manifest['num_users']} "
             f"users; backbone {cfg.llm.backbone}; seeds {','.join(map(str, seeds))}")
    table = render(records, title)
    print("\n" + table + f"\n\nwall time {total / 60:.1f} min", flush=True)
    out = args.out
    write_text(os.path.join(out, "results.md"), table + f"\n\nconfig hash {config_hash(cfg)}, data fingerprint "
               f"{prepared.fingerprint[:12]}, wall time {total / 60:.1f} min\n")
    write_json(os.path.join(out, "results.json"), {"config_hash": config_hash(cfg), "seeds": seeds,
                                                   "data_fingerprint": prepared.fingerprint,
                                                   "wall_seconds": round(total, 1), "records": records})
    plot(records, os.path.join(out, "results.png"), title)
    print(f"[main] wrote {out}/results.md, results.json, results.png")


if __name__ == "__main__":
    cli.run_main(main)
