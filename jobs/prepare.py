"""Prepare a dataset: raw interactions -> sharded Parquet + vocabulary + manifest, then stream it.

    python jobs/prepare.py --config configs/prepare_ml100k.yaml
    ray job submit --working-dir . -- python jobs/prepare.py --config configs/prepare_ml1m.yaml
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.data.prepare import format_summary  # noqa: E402
from idle_ray.train.builders import prepare_from_config  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--no-stream", action="store_true", help="skip the Ray Data streaming check")
    args, cfg = cli.parse(p, argv)
    d = cfg.data
    ds = prepare_from_config(cfg)
    print(format_summary(ds))
    if not args.no_stream:
        import ray
        from idle_ray.data.pipeline import split_datasets
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        counts = {s: x.count() for s, x in split_datasets(ds, d.max_history, d.train_targets_per_user).items()}
        expected = ds.manifest["splits"]
        print("streamed     " + ", ".join(f"{s} {n:,}" for s, n in counts.items()))
        if counts != expected:
            raise SystemExit(f"error: streamed sample counts {counts} differ from the manifest {expected}")
    print(f"prepared     {ds.path}")


if __name__ == "__main__":
    cli.run_main(main)
