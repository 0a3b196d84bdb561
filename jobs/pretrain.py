"""Pre-train an ID sequential model (SASRec / GRU4Rec / Caser) on Ray Train, export it, test it once.

    python jobs/pretrain.py --config configs/pretrain_sasrec_ml100k.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain_sasrec_ml1m.yaml

Prints the test metrics of every protocol in ``eval.protocols`` (e.g. ours, history masked, next to
RecBole's rule, history rankable), each as mean ± one standard error over users.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--output", default="", help="write the test metrics JSON here")
    args, cfg = cli.parse(p, argv)
    from idle_ray.results.tables import protocols_table
    from idle_ray.train.runs import pretrain_and_test

    prepared, record = pretrain_and_test(cfg)
    wall = record.get("wall_seconds")
    print(f"\n{cfg.id_model.name} on {prepared.manifest['dataset']} (seed {cfg.seed}): {record.get('epochs')} epochs, "
          f"best validation NDCG@10 {record.get('best_val_ndcg@10') or 0:.4f} at epoch {record.get('best_epoch')} "
          f"({cfg.eval.select_protocol}), " + (f"{wall:.0f} s of epochs" if wall is not None else "wall unknown"))
    test = record["test"]
    print(f"test, {test['users']} users, mean ± one standard error over users:")
    print(protocols_table(test))
    for protocol in cfg.eval.protocols:
        print(f"{protocol}: " + " ".join(f"{k} {v:.4f}" for k, v in test[protocol].items()))
    if args.output:
        from idle_ray.results.files import write_json
        write_json(args.output, record)


if __name__ == "__main__":
    cli.run_main(main)
