"""Search the adapter's prompt length, projection width, MMD weight and learning rate with Ray Tune
(OptunaSearch TPE + ASHA on validation NDCG@10), then test the best trial once next to the baselines.

    python jobs/tune.py --config configs/tune_ml100k.yaml
    python jobs/tune.py --config configs/tune_ml100k.yaml --grid      (full grid over tune.grid: benchmark)
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_ml1m.yaml
    python jobs/report.py --experiment runs/<experiment name>          (static report of the search)

Rerunning the same command resumes an interrupted search (``Tuner.restore``): finished trials are
kept, unfinished ones continue from their last Train checkpoint. Each trial's curves are in
TensorBoard (``tensorboard --logdir <train.storage_path>``) and the search in the Ray dashboard.
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--grid", action="store_true", help="run the full grid over tune.grid instead of the search")
    p.add_argument("--baselines", default="id_only,llm_only",
                   help="variants trained/evaluated on test next to the tuned adapter (comma list; '' for none)")
    p.add_argument("--no-test", action="store_true", help="search only; skip the test evaluation")
    args, cfg = cli.parse(p, argv)
    from idle_ray.tune.experiment import SearchInterrupted, run_search

    try:
        run_search(cfg, grid=args.grid, baselines=[b for b in args.baselines.split(",") if b],
                   test=not args.no_test, log=functools.partial(print, flush=True))
    except SearchInterrupted as e:
        cli.fail(e, code=130)


if __name__ == "__main__":
    cli.run_main(main)
