"""Train one IDLE-Adapter variant on Ray Train + DeepSpeed (pre-training the ID model first if needed),
then evaluate the validation-selected adapter once on test.

    python jobs/train.py --config configs/train_ml100k.yaml
    python jobs/train.py --config configs/train_ml100k.yaml --set adapter.variant=llm_only
    ray job submit --working-dir . -- python jobs/train.py --config configs/train_ml1m.yaml
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--output", default="", help="write the result JSON here")
    args, cfg = cli.parse(p, argv)
    from idle_ray.train.runs import pretrain_train_and_test

    prepared, record = pretrain_train_and_test(cfg)
    print(f"\n{cfg.adapter.variant} on {prepared.manifest['dataset']} (seed {cfg.seed}), test, full ranking:")
    print(" ".join(f"{k} {v:.4f}" for k, v in record["test"]["full"].items()))
    if args.output:
        from idle_ray.results.files import write_json
        write_json(args.output, record)


if __name__ == "__main__":
    cli.run_main(main)
