"""Benchmark: the Ray Data training feed vs a single-process pyarrow + numpy reader (same transformation).

    python benchmarks/data_pipeline.py --config configs/prepare_ml1m.yaml --repeats 3 --passes 5

Prints rows/s (training samples) of both, median over repeats, and their ratio, for one pass
over the shards (Ray's fixed start-up cost included) and for a long stream of ``--passes`` passes
in one pipeline execution (steady state: start-up amortised). The Ray feed is the training
workers': Ray Data moves user sequences (``pipeline.sequence_dataset``) and the consumer windows
them (``feed.sample_batches``). ``--map-windowing`` adds the windowing in Ray Data ``map_batches``
tasks (``pipeline.split_dataset``: evaluation, and training with a prompt stage) for comparison.

Ray runs its worker processes at niceness 15 (``RAY_worker_niceness``), the training worker that
consumes the feed among them; ``--niceness 15`` renices the driver (both readers) to the same
priority (default -1: leave it). ``--stats`` prints ``Dataset.stats()`` of the last Ray run
(where the time goes).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.data.feed import Windowing, sample_batches  # noqa: E402
from idle_ray.data.pipeline import local_numpy_reader, sequence_dataset, split_dataset  # noqa: E402
from idle_ray.data.prepare import prepare_dataset  # noqa: E402


def time_local(ds, max_history, passes):
    t0 = time.perf_counter()
    rows = sum(len(b["target"]) for _ in range(passes) for b in local_numpy_reader(ds, "train", max_history))
    return rows, time.perf_counter() - t0


def time_ray(ds, max_history, batch_size, passes, stats=None):
    """The training feed: sequences through Ray Data, windowed where the batches are consumed."""
    t0 = time.perf_counter()
    rows = 0
    dataset = sequence_dataset(ds, passes=passes)
    blocks = dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    for b in sample_batches(blocks, Windowing("train", max_history), batch_size):
        rows += len(b["target"])
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats[:] = [dataset.stats()]
    return rows, seconds


def time_ray_map(ds, max_history, batch_size, passes, stats=None):
    """Windowing in Ray Data ``map_batches`` tasks, samples moved to the consumer."""
    t0 = time.perf_counter()
    rows = 0
    dataset = split_dataset(ds, "train", max_history, shuffle=False, passes=passes)
    for b in dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4):
        rows += len(b["target"])
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats[:] = [dataset.stats()]
    return rows, seconds


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--passes", type=int, default=10, help="passes over the shards for the steady-state rows")
    p.add_argument("--niceness", type=int, default=-1,
                   help="renice this process to this niceness first (Ray workers run at 15; -1: leave it)")
    p.add_argument("--stats", action="store_true", help="print Dataset.stats() of the last Ray run(s)")
    p.add_argument("--map-windowing", action="store_true",
                   help="also time the windowing in Ray Data map_batches tasks (split_dataset)")
    args, cfg = cli.parse(p, argv)
    d = cfg.data
    ds = prepare_dataset(d.dataset, d.output_dir, min_user_interactions=d.min_user_interactions,
                         min_item_interactions=d.min_item_interactions, rows_per_shard=d.rows_per_shard,
                         path=d.path, items_path=d.items_path)
    import ray
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.niceness >= 0:
        os.nice(max(0, args.niceness - os.nice(0)))
    readers = {"local": time_local, "ray": time_ray}
    labels = {"local": "single-process pyarrow + numpy", "ray": "Ray Data feed, windowed in the consumer"}
    if args.map_windowing:
        readers["map"] = time_ray_map
        labels["map"] = "Ray Data, windowed in map_batches tasks"
    stats = {k: [] for k in readers if k != "local"}
    for k in stats:
        readers[k](ds, d.max_history, args.batch_size, 1)  # warm-up: worker processes, imports
    rates = {(k, tag): [] for k in readers for tag in ("1", "P")}
    load = [os.getloadavg()]
    for _ in range(args.repeats):
        for passes, tag in ((1, "1"), (args.passes, "P")):
            n, t = time_local(ds, d.max_history, passes)
            rates["local", tag].append(n / t)
            for k in stats:
                n2, t2 = readers[k](ds, d.max_history, args.batch_size, passes, stats[k])
                assert n2 == n, (k, n2, n)
                rates[k, tag].append(n2 / t2)
    load.append(os.getloadavg())
    med = statistics.median
    print(f"\n{d.dataset}: {n // args.passes:,} training samples per pass, history {d.max_history}, "
          f"median of {args.repeats} repeats, {os.cpu_count()} CPUs, niceness {os.nice(0)}, "
          f"load average (1, 5, 15 min) before {load[0][0]:.1f}, {load[0][1]:.1f}, {load[0][2]:.1f}, "
          f"after {load[1][0]:.1f}, {load[1][1]:.1f}, {load[1][2]:.1f}\n")
    print("| stream | reader | rows/s (median) | min | max | Ray / single-process |")
    print("|---|---|---|---|---|---|")
    for tag, label in (("1", "1 pass"), ("P", f"{args.passes} passes (steady state)")):
        lo = rates["local", tag]
        for k in readers:
            r = rates[k, tag]
            ratio = "" if k == "local" else f"{med(r) / med(lo):.2f}x"
            print(f"| {label} | {labels[k]} | {med(r):,.0f} | {min(r):,.0f} | {max(r):,.0f} | {ratio} |")

    if args.stats:
        for k, st in stats.items():
            print(f"\nDataset.stats() of the last run of '{labels[k]}' ({args.passes} passes):\n{st[0]}")


if __name__ == "__main__":
    cli.run_main(main)
