"""Serve recommendations online on Ray Serve: POST /recommend, GET /healthz, GET /stats.

    python jobs/serve.py --config configs/main_ml100k.yaml         (the main job's seed-0 IDLE run)
    python jobs/serve.py --config configs/main_ml100k.yaml --set serve.run=NAME --set serve.max_replicas=4
    serve run idle_ray.serve.online:app config=configs/main_ml100k.yaml             (Ray's own CLI)
    curl -s -X POST 127.0.0.1:8000/recommend -d '{"history": ["50", "172", "133"], "k": 5}'

The weights are found and checked as in jobs/evaluate.py (serve.run / serve.weights, default: the run
jobs/train.py trains for the config) before anything starts; bad ones stop the job with exit code 2.
Replica autoscaling, request batching and limits come from the config's ``serve`` section. Stop with
Ctrl-C (the application is shut down with the embedded Ray).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--no-block", action="store_true", help="deploy and return (for a long-lived cluster)")
    args, cfg = cli.parse(p, argv)
    from ray import serve

    from idle_ray.models.artifact import ArtifactError
    from idle_ray.serve.online import build
    from idle_ray.train.launch import ensure_ray

    try:
        application = build(cfg)
    except ArtifactError as e:
        cli.fail(e)
    ensure_ray()
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    print(f"[serve] POST http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}/recommend  "
          f"(GET .../healthz, .../stats); Ctrl-C stops", flush=True)
    serve.run(application, name=cfg.name, route_prefix=s.route_prefix, blocking=not args.no_block)


if __name__ == "__main__":
    cli.run_main(main)
