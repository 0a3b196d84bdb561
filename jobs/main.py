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
LABELS = {"id_only": "SASRec (ID only)", "llm_only": "LLM-only", "idle": "IDLE-Adapter"}


def with_variant(cfg, variant: str):
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, variant=variant))


def render(records: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| model | " + " | ".join(c.upper().replace("@", "@") for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for r in records:
        full = r["test"]["full"]
        lines.append(f"| {LABELS.get(r['variant'], r['variant'])} | " +
                     " | ".join(f"{full[c]:.4f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from idle_ray.train.report import _atomic_write
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(records)
    x = np.arange(len(COLUMNS))
    for i, r in enumerate(records):
        ax.bar(x + i * width, [r["test"]["full"][c] for c in COLUMNS], width, label=LABELS.get(r["variant"]))
    ax.set_xticks(x + width * (len(records) - 1) / 2, [c.upper() for c in COLUMNS])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="results/main", help="folder for results.{md,json,png}")
    args, cfg = cli.parse(p, argv)
    from idle_ray.data.prepare import format_summary
    from idle_ray.train import builders
    from idle_ray.train.report import write_json, write_text
    from jobs.pretrain import pretrain
    from jobs.train import train_and_test

    t0 = time.time()
    prepared = builders.prepare_from_config(cfg)
    print(format_summary(prepared), flush=True)
    artifact, meta = pretrain(cfg, prepared)
    print(f"[main] SASRec ready ({time.time() - t0:.0f} s)", flush=True)
    records = []
    for variant in ("id_only", "llm_only", "idle"):
        t = time.time()
        rec = train_and_test(with_variant(cfg, variant), prepared, artifact)
        rec["seconds"] = round(time.time() - t, 1)
        records.append(rec)
        print(f"[main] {variant} done in {rec['seconds']:.0f} s: " +
              " ".join(f"{c} {rec['test']['full'][c]:.4f}" for c in COLUMNS), flush=True)
    total = time.time() - t0
    title = (f"MovieLens-100K test, full ranking over {prepared.num_items:,} items, {prepared.manifest['num_users']} "
             f"users; backbone {cfg.llm.backbone}; seed {cfg.seed}")
    table = render(records, title)
    print("\n" + table + f"\n\nwall time {total / 60:.1f} min", flush=True)
    out = args.out
    write_text(os.path.join(out, "results.md"), table + f"\n\nconfig hash {config_hash(cfg)}, data fingerprint "
               f"{prepared.fingerprint[:12]}, wall time {total / 60:.1f} min\n")
    write_json(os.path.join(out, "results.json"), {"config_hash": config_hash(cfg), "seed": cfg.seed,
                                                   "data_fingerprint": prepared.fingerprint,
                                                   "wall_seconds": round(total, 1), "records": records})
    plot(records, os.path.join(out, "results.png"), title)
    print(f"[main] wrote {out}/results.md, results.json, results.png")


if __name__ == "__main__":
    cli.run_main(main)
