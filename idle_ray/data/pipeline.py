"""Ray Data pipelines streaming prepared shards into training and evaluation workers.

Training without a prompt stage: ``sequence_dataset`` (``read_parquet(sequences/)``, user sequences),
windowed by the worker that consumes it (:mod:`idle_ray.data.feed`). Otherwise ``split_dataset``:
``read_parquet(sequences/) -> map_batches(sample_block) [-> map_batches(extra stage, e.g. prompt
tokenisation)]``. Datasets are lazy and streamed: pass them to ``TorchTrainer(datasets=...)`` and
consume them with ``ray.train.get_dataset_shard(split)`` inside the worker; nothing materialises the
full dataset on one node.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from idle_ray.data.prepare import PreparedDataset
from idle_ray.data.samples import ALL_SPLITS, SPLITS, build_samples

if TYPE_CHECKING:
    import ray.data

# CPU reserved per data task/actor. Small on purpose: Ray Data's budget is what train workers
# leave over, split between operators; larger requests can leave an operator unschedulable
# ("Cluster resources are not enough") next to two workers on two CPUs.
DATA_CPUS = 0.1


def arrow_block(columns: dict):
    """A batch of numpy columns (as ``build_samples`` returns) as the Arrow table Ray itself would
    build from it: 1-D numeric columns as plain arrays, 2-D ones as Ray's tensor extension.

    Why: returning a dict makes Ray infer every 1-D column's type with ``pa.infer_type``, which
    visits each value (about 20 ms per 45k ints, more than the windowing); these types are known.
    A batch with any other column (the ragged ``seen`` of valid/test) goes through Ray's conversion.
    """
    import pyarrow as pa
    from ray.data.block import BlockAccessor
    from ray.data.extensions import ArrowTensorArray
    if not all(getattr(v, "dtype", None) is not None and v.dtype.kind in "biuf" and v.ndim >= 1
               for v in columns.values()):
        return BlockAccessor.batch_to_block(columns)
    return pa.table({k: pa.array(v) if v.ndim == 1 else ArrowTensorArray.from_numpy(v) for k, v in columns.items()})


def sample_block(batch, **kwargs):
    """``map_batches`` stage: :func:`~idle_ray.data.samples.build_samples` as an Arrow block."""
    return arrow_block(build_samples(batch, **kwargs))


def _as_arrow_block(fn):
    """An extra stage ``fn(batch: dict, **kw) -> dict`` returning Arrow blocks (see :func:`arrow_block`)."""
    def stage(batch, **kwargs):
        return arrow_block(fn(batch, **kwargs))
    stage.__name__ = getattr(fn, "__name__", "stage")
    return stage


def read_sequences(files: list[str], shuffle=None, num_blocks: int | None = None) -> ray.data.Dataset:
    """The ``user, items`` columns of the sequence shards (paths or URIs: read tasks on any node open them).

    ``num_blocks``: read tasks (and blocks); ``None`` lets Ray choose (it splits small files into more
    blocks, and so more tasks, to reach its default parallelism).
    """
    import ray.data

    # Fractional CPUs: reads must still schedule next to train workers that hold most cores.
    # The V2 Parquet path lists files in a task that asks a whole CPU whatever num_cpus says,
    # which never schedules once Train workers (or several Tune trials) hold the rest; we list
    # the shards ourselves, so the V1 reader (one 0.1-CPU task per shard) is enough.
    ctx = ray.data.DataContext.get_current()
    was, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, shuffle=shuffle, num_cpus=DATA_CPUS, override_num_blocks=num_blocks
                                     ).select_columns(["user", "items"])
    finally:
        ctx.use_datasource_v2 = was


def sequence_blocks(prepared: PreparedDataset) -> int:
    """Read tasks per pass over the sequences: as few as Ray's target block size allows (ML-1M's
    sequences, ~4 MB in memory, are one block), at most one per shard.

    Why: a Ray Data task costs scheduling and a hand-over that, on a busy node, take far longer than
    reading a shard (ML-1M, 2 shared CPUs: 7 tasks a pass ran at 0.13x the single-process reader,
    1 task at 0.77x; README, "Data pipeline benchmark").
    """
    import math

    import ray.data
    files = prepared.shard_files
    stats = prepared.manifest.get("stats", {})
    if "interactions" not in stats:
        return len(files)
    in_memory = 4 * stats["interactions"] + 12 * stats.get("users", 0)  # int32 items; user + list offset
    target = ray.data.DataContext.get_current().target_max_block_size or 128 * 1024 ** 2
    return max(1, min(len(files), math.ceil(in_memory / target)))


def sequence_dataset(prepared: PreparedDataset, passes: int = 1) -> ray.data.Dataset:
    """The training feed's dataset: user sequences in :func:`sequence_blocks` blocks a pass, in shard
    order; the worker windows them (:mod:`idle_ray.data.feed`). ``passes > 1`` (benchmarks): one
    read of the shard list repeated (a union of reads adds operators and seconds before the first block)."""
    return read_sequences(prepared.shard_files * passes, num_blocks=sequence_blocks(prepared) * passes)


def split_dataset(prepared: PreparedDataset, split: str, max_history: int, targets_per_user: int = 0,
                  extra_stage: tuple[type, dict] | None = None, batch_size: int = 256,
                  shuffle: bool | None = None, passes: int = 1, windows: bool = False,
                  max_user: int = 0, seed: int | None = None, holdout=0, rank: int = 0,
                  world: int = 1, users=None) -> ray.data.Dataset:
    """One split as a lazy ``ray.data.Dataset`` of model-ready samples (evaluation, recommendations,
    and training with a prompt stage; training without one windows in the worker, :func:`sequence_dataset`).

    ``extra_stage``: ``(function, kwargs)`` applied after windowing (e.g. prompt tokenisation).
    ``shuffle`` (default: train only) without ``seed`` randomises the file order (the consumer
    adds a local shuffle buffer). With ``seed`` (training): samples get a **seeded global shuffle**
    (``random_shuffle(seed)``, before tokenisation, so only the small integer columns move);
    pre-training windows get a seeded file order instead (see the code). With order-preserving
    execution (``DataConfig(execution_options=...preserve_order=True)``) the stream is then the same
    in every run.
    ``rank``/``world``: only the users with ``user % world == rank`` (a worker's deterministic
    share: one dataset per rank). ``holdout``: an int N, the last N training targets left out
    (pre-training on out-of-sample targets for the adapter), or a :class:`~idle_ray.data.samples.Holdout`
    (a seeded per-user draw among the last targets; the adapter's samples with ``adapter=True``). ``max_user > 0`` keeps users ``1..max_user`` (smoke runs);
    ``users`` (dense ids) keeps only those. ``split="next"``: the whole sequence as history, for
    recommendations.
    """
    import ray.data  # here, not at module level: the standalone worker reads shards without Ray

    if split not in ALL_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {ALL_SPLITS}")
    files = prepared.shard_files  # local paths or URIs: read tasks on any node open them
    shuffle = shuffle if shuffle is not None else split == "train"
    # Pre-training windows (many epochs; an all-to-all shuffle per epoch costs Ray tasks and worker
    # start-ups that dwarf SASRec's step): shards in a seeded order, re-mixed by the consumer's
    # seeded buffer. Adapter samples: read in order, then the seeded global shuffle below.
    shuffle_files = None
    if shuffle and seed is None:
        shuffle_files = "files"
    elif shuffle and windows:
        shuffle_files = ray.data.FileShuffleConfig(seed=seed)
    ds = read_sequences(files, shuffle_files)
    if passes > 1:
        ds = ds.union(*[read_sequences(files, shuffle_files) for _ in range(passes - 1)])
    # Windowing is cheap and stateless: plain tasks, so it scales with the cluster's CPUs.
    ds = ds.map_batches(sample_block, fn_kwargs={
        "split": split, "max_history": max_history, "targets_per_user": targets_per_user, "windows": windows,
        "max_user": max_user, "holdout": holdout, "rank": rank, "world": world, "users": users},
        batch_format="pyarrow", batch_size=batch_size, num_cpus=DATA_CPUS)
    if shuffle and seed is not None and not windows:
        ds = ds.random_shuffle(seed=seed, num_cpus=DATA_CPUS)
    if extra_stage is not None:
        fn, kwargs = extra_stage
        # A task (not an actor pool): next to train workers that hold most CPUs, Ray Data may not
        # be able to schedule reads beside a reserved actor pool. Expensive set-up (a tokenizer)
        # is cached per worker process by the stage function itself.
        ds = ds.map_batches(_as_arrow_block(fn), fn_kwargs=kwargs, batch_format="numpy", batch_size=batch_size, num_cpus=DATA_CPUS)
    return ds


def split_datasets(prepared: PreparedDataset, max_history: int, targets_per_user: int = 0,
                   splits=SPLITS, **kwargs) -> dict[str, ray.data.Dataset]:
    """``{split: Dataset}`` for the requested splits (see :func:`split_dataset`)."""
    return {s: split_dataset(prepared, s, max_history, targets_per_user, **kwargs) for s in splits}


def sample_counts(prepared: PreparedDataset, split: str, max_history: int, targets_per_user: int = 0,
                  windows: bool = False, holdout=0, world: int = 1) -> list[int]:
    """Samples a split yields for each rank's users (``user % world == rank``), ranks ``0..world-1``:
    the manifest's count when it applies, else recomputed from one read of the sequence lengths."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from idle_ray.data.prepare import train_sample_count
    from idle_ray.data.samples import Holdout, heldout_count, window_count
    plain = not windows and not holdout and targets_per_user == prepared.manifest["train_targets_per_user"]
    if world == 1 and (split != "train" or plain):
        return [int(prepared.manifest["splits"][split])]
    table = pa.concat_tables(pq.read_table(f, columns=["user", "items"]) for f in prepared.shard_files)
    all_lengths = np.asarray(pc.list_value_length(table["items"]))
    shares = np.asarray(table["user"]) % world
    counts = []
    for rank in range(world):
        lengths = all_lengths[shares == rank]
        if split != "train":
            counts.append(int(len(lengths)))
        elif windows:
            counts.append(window_count(lengths, max_history, holdout))
        elif isinstance(holdout, Holdout):
            held = int(heldout_count(lengths, holdout).sum())
            counts.append(held if holdout.adapter else train_sample_count(lengths, 0) - held)
        else:
            counts.append(train_sample_count(lengths - holdout, targets_per_user))
    return counts


def sample_count(prepared: PreparedDataset, split: str, max_history: int, targets_per_user: int = 0,
                 windows: bool = False, holdout=0, rank: int = 0, world: int = 1) -> int:
    """Samples a split yields for the users ``user % world == rank`` (see :func:`sample_counts`)."""
    return sample_counts(prepared, split, max_history, targets_per_user, windows, holdout, world)[rank]


def local_numpy_reader(prepared: PreparedDataset, split: str, max_history: int, targets_per_user: int = 0,
                       windows: bool = False, holdout=0):
    """Single-process baseline: pyarrow + numpy, same transformation, one shard at a time.

    Used by tests (equivalence with the Ray pipeline) and by the data benchmark.
    """
    import pyarrow.parquet as pq
    for f in prepared.shard_files:
        out = build_samples(pq.read_table(f, columns=["user", "items"]), split, max_history, targets_per_user,
                            windows, holdout=holdout)
        yield out
