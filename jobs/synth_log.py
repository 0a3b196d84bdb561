"""Write a seeded synthetic interaction log (Parquet, power-law users and items, timestamp ties) in chunks.

    python jobs/synth_log.py --interactions 100000000 --out /data/synth-100m.parquet
    python jobs/synth_log.py --interactions 1000000 --out synth-1m.parquet --titles synth-1m-items.parquet
    python jobs/prepare.py --set data.dataset=parquet --set data.path=synth-1m.parquet \
        --set data.items_path=synth-1m-items.parquet

Memory holds one block of a million rows, whatever ``--interactions`` is; the same arguments
write the same log (see :mod:`idle_ray.data.synthetic`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray.data.synthetic import write_synthetic_log  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, required=True, help="rows of the log")
    p.add_argument("--out", required=True, help="the Parquet file to write")
    p.add_argument("--titles", default="", help="also write an item table (item_id, title) here")
    p.add_argument("--users", type=int, default=0, help="distinct users (0: interactions // 50)")
    p.add_argument("--items", type=int, default=0, help="distinct items (0: interactions // 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--user-alpha", type=float, default=2.0, help="Pareto shape of user activity (smaller: heavier tail)")
    p.add_argument("--item-alpha", type=float, default=1.0, help="Zipf exponent of item popularity")
    p.add_argument("--tie-rate", type=float, default=0.05, help="share of rows with the previous row's user and second")
    p.add_argument("--duplicate-rate", type=float, default=0.001, help="share of rows repeating the previous row")
    p.add_argument("--int-ids", action="store_true", help="integer ids instead of strings u<n> / i<n>")
    args = p.parse_args(argv)
    for name in ("interactions", "users", "items"):
        if getattr(args, name) < (1 if name == "interactions" else 0):
            p.error(f"--{name} must be >= {1 if name == 'interactions' else 0}")
    if args.user_alpha <= 0 or args.item_alpha < 0 or not 0 <= args.tie_rate < 1 or not 0 <= args.duplicate_rate < 1:
        p.error("--user-alpha > 0, --item-alpha >= 0, and the rates in [0, 1)")
    out = write_synthetic_log(args.out, args.interactions, users=args.users, items=args.items, seed=args.seed,
                              user_alpha=args.user_alpha, item_alpha=args.item_alpha, tie_rate=args.tie_rate,
                              duplicate_rate=args.duplicate_rate, string_ids=not args.int_ids,
                              titles_path=args.titles)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
