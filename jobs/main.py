"""The main job: MovieLens-100K end to end on local Ray (or a cluster).

prepare MovieLens-100K -> pre-train SASRec (on every training target, and without each user's last
targets for the adapter) -> train IDLE-Adapter (and, with --variants, the LLM-only baseline, LLaRA
and the ablations) on SmolLM2-135M (real weights) under Ray Train + DeepSpeed -> test each once -> print a table (mean ± std over seeds, IDLE
vs the best baseline with a paired bootstrap interval) and write it as Markdown + JSON + PNG.

    python jobs/main.py --config configs/main_ml100k.yaml                    (make run)
    python jobs/main.py --config configs/main_ml100k.yaml --seeds 0,1,2
    python jobs/main.py --config configs/main_ml100k.yaml --from-results results/a/results.json,results/b/results.json
    ray job submit --working-dir . -- python jobs/main.py --config configs/main_ml100k.yaml
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    from idle_ray.experiments import DEFAULT_ROWS, ROWS
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="results/main", help="folder for results.{md,json,png}")
    p.add_argument("--seeds", default="", help="comma list of seeds (default: the config's seed)")
    p.add_argument("--variants", default=",".join(DEFAULT_ROWS),
                   help=f"comma list of rows from {', '.join(ROWS)} (default: {','.join(DEFAULT_ROWS)})")
    p.add_argument("--from-results", default="",
                   help="comma list of results.json files: pool their records (e.g. seeds run as separate jobs) "
                        "and write the tables to --out, without training")
    args, cfg = cli.parse(p, argv)
    from idle_ray.config import ConfigError
    from idle_ray.experiments import merge_results, run_main_job

    if args.from_results:
        merge_results(cfg, [x.strip() for x in args.from_results.split(",") if x.strip()], args.out,
                      log=functools.partial(print, flush=True))
        return

    rows = [v.strip() for v in args.variants.split(",") if v.strip()]
    if [v for v in rows if v not in ROWS] or not rows:
        cli.fail(ConfigError(f"--variants {args.variants!r}: choose rows from {', '.join(ROWS)}"))
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        cli.fail(ConfigError(f"--seeds {args.seeds!r}: a comma list of integers, e.g. 0,1,2"))
    run_main_job(cfg, args.out, seeds=seeds, rows=rows, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    cli.run_main(main)
