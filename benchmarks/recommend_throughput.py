"""Benchmark: recommendations in batch (Ray Data actor pool vs a single-process loop) and online
(Ray Serve under a bounded load on 127.0.0.1).

    python benchmarks/recommend_throughput.py --config configs/pretrain_sasrec_ml100k.yaml --kind id_model
    python benchmarks/recommend_throughput.py --config configs/main_ml100k.yaml --users 200 --requests 200

Batch: users/s for the same users, K and batch size (``eval.batch_size``) through ``jobs/recommend.py``'s
pipeline with 1 and 2 actors, and through a plain loop in this process (shards read with pyarrow,
same sample code, same model, same top-K); median of ``--repeats``. Online: ``--requests`` POSTs of
real user histories at 1, 8 and 32 concurrent clients: requests/s, p50 / p99 latency and the batch
sizes ``@serve.batch`` formed. Prints two Markdown tables.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from idle_ray import cli  # noqa: E402


def single_process(cfg, prepared, kind, weights, artifact, users, k):
    """Users/s of a plain loop (``serve.batch.local_top_k``: shards, samples, tokenise, score, top-K) + id mapping."""
    import torch

    from idle_ray.serve.batch import local_top_k
    from idle_ray.serve.topk import Vocabulary
    from idle_ray.train.evaluate import scoring_model
    torch.set_num_threads(1)
    model = scoring_model(cfg, prepared, kind, weights, artifact)
    vocab = Vocabulary(prepared.path)
    t0, n = time.perf_counter(), 0
    for batch_users, items, _, _ in local_top_k(cfg, prepared, model, k, users):
        _ = vocab.item_ids[items], vocab.titles[items]
        n += len(batch_users)
    return n / (time.perf_counter() - t0)


def load_test(url, bodies, clients):
    def one(body):
        t = time.perf_counter()
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
        return time.perf_counter() - t
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    return len(bodies) / wall, float(np.percentile(lat, 50)) * 1000, float(np.percentile(lat, 99)) * 1000


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["adapter", "id_model"], default="adapter")
    p.add_argument("--run", default="", help="adapter run (default: the config's)")
    p.add_argument("--users", type=int, default=0, help="first N users only (0: all)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=1000, help="online requests per concurrency level")
    args, cfg = cli.parse(p, argv)
    import dataclasses

    from ray import serve

    from idle_ray.serve.batch import recommend
    from idle_ray.serve.online import build
    from idle_ray.train.launch import ensure_ray
    from idle_ray.train.runs import evaluation_inputs
    from idle_ray.train.weights import WeightsError

    try:
        inputs = evaluation_inputs(cfg, args.kind, "test", "", args.run)
    except WeightsError as e:
        cli.fail(e)
    prepared, artifact, weights = inputs["prepared"], inputs["artifact"], inputs["record"].get("weights") or None
    n_users = args.users or prepared.manifest["num_users"]
    users = np.arange(1, n_users + 1, dtype=np.int32)
    ensure_ray()
    rows = []
    local = [single_process(cfg, prepared, args.kind, weights, artifact, users, args.top_k) for _ in range(args.repeats)]
    rows.append(("single process", statistics.median(local)))
    for actors in (1, 2):
        rates = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                recommend(cfg, prepared, os.path.join(tmp, "recs"), kind=args.kind, k=args.top_k, artifact=artifact,
                          weights=weights, users=users, actors=actors, cpus_per_actor=1.0 if actors == 1 else 0.9,
                          threads=1, log=lambda *a: None)
                rates.append(n_users / (time.perf_counter() - t0))
        rows.append((f"Ray Data, {actors} actor{'s' if actors > 1 else ''}", statistics.median(rates)))
    print(f"\nBatch recommendations, {n_users} users, top-{args.top_k}, batch {cfg.eval.batch_size}, "
          f"{args.kind}, median of {args.repeats} (Ray Data: job start-up included)\n")
    print("| path | users/s | vs single process |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.1f} | {rate / rows[0][1]:.2f}x |")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, kind=args.kind, run=args.run,
                                                             min_replicas=1, max_replicas=1))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg, log=lambda *a: None), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    import pyarrow.parquet as pq

    from idle_ray.serve.topk import Vocabulary
    vocab = Vocabulary(prepared.path)
    seqs = pq.read_table(prepared.sequences_dir).to_pydict()
    histories = [[vocab.item_ids[i] for i in items] for items in seqs["items"][:n_users]]
    print(f"\nOnline (Ray Serve, 1 replica, {cfg.serve.cpus_per_replica:g} CPU, max batch {cfg.serve.max_batch_size}, "
          f"wait {cfg.serve.batch_wait_timeout_s * 1000:g} ms), {args.requests} requests per level, top-{args.top_k}\n")
    print("| clients | requests/s | p50 ms | p99 ms | batch sizes formed (size: count) |\n|---|---|---|---|---|")
    for clients in (1, 8, 32):
        before = json.loads(urllib.request.urlopen(f"{url}/stats").read())["batch_sizes"]
        bodies = [{"history": histories[i % len(histories)], "k": args.top_k} for i in range(args.requests)]
        rps, p50, p99 = load_test(f"{url}/recommend", bodies, clients)
        after = json.loads(urllib.request.urlopen(f"{url}/stats").read())["batch_sizes"]
        formed = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        print(f"| {clients} | {rps:,.1f} | {p50:.1f} | {p99:.1f} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(formed.items(), key=lambda kv: int(kv[0])))} |")
    serve.shutdown()


if __name__ == "__main__":
    cli.run_main(main)
