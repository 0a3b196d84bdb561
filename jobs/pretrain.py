"""Pre-train an ID sequential model (SASRec / GRU4Rec / Caser) on Ray Train, export it, test it once.

    python jobs/pretrain.py --config configs/pretrain_sasrec_ml100k.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain_sasrec_ml1m.yaml
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
    from idle_ray.train.runs import pretrain_and_test

    prepared, record = pretrain_and_test(cfg)
    print(f"\n{cfg.id_model.name} on {prepared.manifest['dataset']} (seed {cfg.seed}), test, full ranking:")
    print(" ".join(f"{k} {v:.4f}" for k, v in record["test"]["full"].items()))
    if args.output:
        from idle_ray.results.files import write_json
        write_json(args.output, record)


if __name__ == "__main__":
    cli.run_main(main)
