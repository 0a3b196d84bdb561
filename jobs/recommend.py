"""Top-K recommendations for every user (or a list of users), on Ray Data, written as Parquet.

    python jobs/recommend.py --config configs/train_ml100k.yaml --top-k 10 --output results/recs
    python jobs/recommend.py --config configs/train_ml100k.yaml --run NAME --users users.txt --top-k 20 \\
        --output s3://bucket/recs/today
    python jobs/recommend.py --config configs/pretrain_sasrec_ml100k.yaml --kind id_model --top-k 10 --output recs
    ray job submit --working-dir . -- python jobs/recommend.py --config configs/train_ml1m.yaml --top-k 10 --output s3://...

The history of each user is the whole prepared sequence (train, valid and test items): these are the
items to show next. Items the user already interacted with are left out unless --include-history.
Weights are found as in jobs/evaluate.py (--run / --weights, default: the run jobs/train.py trains
for the config) and checked against the config. Output: Parquet shards with user_id, rank, item_id,
title, score, and manifest.json (written last; the output is complete exactly when it exists).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["adapter", "id_model"], default="adapter",
                   help="adapter: the config's variant with trained weights; id_model: the ID model alone")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--weights", default="", help="adapter weights (path or s3:// / gs:// URI)")
    source.add_argument("--run", default="", help="run name under train.storage_path: its best weights")
    p.add_argument("--top-k", type=int, default=10, help="items per user")
    p.add_argument("--users", default="all", help="'all', or a text file with one original user id per line")
    p.add_argument("--skip-unknown", action="store_true", help="skip unknown ids in --users instead of stopping")
    p.add_argument("--include-history", action="store_true", help="allow items the user already interacted with")
    p.add_argument("--output", required=True, help="folder, NFS path or s3:// / gs:// URI for the Parquet output")
    p.add_argument("--actors", type=int, default=1, help="scoring actors (each loads the models once)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per scoring actor")
    args, cfg = cli.parse(p, argv)
    from idle_ray.config import ConfigError
    from idle_ray.models.artifact import ArtifactError
    from idle_ray.serve.batch import check_k, recommend, select_users
    from idle_ray.train.launch import ensure_ray
    from idle_ray.train.runs import evaluation_inputs
    from idle_ray.train.weights import read_weights_file

    if args.actors < 1 or args.cpus_per_actor <= 0:
        cli.fail(ConfigError("--actors must be >= 1 and --cpus-per-actor > 0"))
    try:  # everything that can be wrong is checked before Ray starts or anything is written
        inputs = evaluation_inputs(cfg, args.kind, "test", args.weights, args.run)
        prepared, artifact, record = inputs["prepared"], inputs["artifact"], inputs["record"]
        check_k(args.top_k, prepared)
        users = select_users(prepared, args.users, args.skip_unknown)
    except (ArtifactError, ConfigError) as e:
        cli.fail(e)
    weights = record.get("weights") or None
    info = {"run": record.get("run", ""), "seed": cfg.seed}
    if weights:
        info["weights_metadata"] = read_weights_file(weights)[1]
    ensure_ray()
    recommend(cfg, prepared, args.output, kind=args.kind, k=args.top_k, artifact=artifact, weights=weights,
              users=users, exclude_history=not args.include_history, actors=args.actors,
              cpus_per_actor=args.cpus_per_actor, threads=max(1, round(args.cpus_per_actor)), info=info)


if __name__ == "__main__":
    cli.run_main(main)
