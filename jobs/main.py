"""The main job: MovieLens-100K end to end on local Ray (or a cluster).

prepare MovieLens-100K -> pre-train SASRec -> train IDLE-Adapter on SmolLM2-135M (real weights)
under Ray Train + DeepSpeed -> train the LLM-only baseline the same way -> evaluate all on test
once -> print a table (HR@5, NDCG@5, HR@10, NDCG@10) and write it as Markdown + JSON + PNG.

    python jobs/main.py --config configs/main_ml100k.yaml          (make run)
    ray job submit --working-dir . -- python jobs/main.py --config configs/main_ml100k.yaml
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="results/main", help="folder for results.{md,json,png}")
    args, cfg = cli.parse(p, argv)
    from idle_ray.experiments import run_main_job

    run_main_job(cfg, args.out, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    cli.run_main(main)
