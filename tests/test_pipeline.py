"""Ray Data streaming: same samples as the single-process reader, consumed inside Ray Train workers."""
import numpy as np
import pytest

from idle_ray.data.pipeline import local_numpy_reader, split_datasets


def _key(batch):
    return sorted(zip(batch["user"].tolist(), batch["target"].tolist(), map(tuple, batch["history"].tolist())))


def test_ray_pipeline_matches_local_reader(ray_local, tiny_prepared):
    dss = split_datasets(tiny_prepared, max_history=4)
    for split, ds in dss.items():
        got = {k: [] for k in ("user", "target", "history")}
        for b in ds.iter_batches(batch_size=16, batch_format="numpy"):
            for k in got:
                got[k].append(b[k])
        got = {k: np.concatenate(v) for k, v in got.items()}
        ref = list(local_numpy_reader(tiny_prepared, split, 4))
        ref = {k: np.concatenate([r[k] for r in ref]) for k in ("user", "target", "history")}
        assert _key(got) == _key(ref), split
        assert len(got["user"]) == tiny_prepared.manifest["splits"][split]


def test_eval_split_carries_seen_items(ray_local, tiny_prepared):
    ds = split_datasets(tiny_prepared, max_history=3, splits=("test",))["test"]
    for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
        for hist, seen, tgt in zip(b["history"], b["seen"], b["target"]):
            real = hist[hist > 0]
            assert list(seen[-len(real):]) == list(real)


def test_streams_into_two_train_workers_without_hanging(ray_local, tiny_prepared):
    """Known trap: 2 workers on 2 CPUs starve Ray Data; fractional CPUs keep it flowing."""
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def worker(config):
        n = 0
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_torch_batches(batch_size=8):
            assert batch["history"].shape[1] == 4
            n += len(batch["target"])
        import torch
        import torch.distributed as dist
        total = torch.tensor([n])
        dist.all_reduce(total)  # every sample streamed exactly once across the two workers
        return {"rows": int(total.item()), "mine": n}

    dss = split_datasets(tiny_prepared, max_history=4, splits=("train",))
    trainer = TorchTrainer(worker, datasets=dss,
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(storage_path=str(tiny_prepared.path.parent / "runs")))
    result = trainer.fit()
    assert result.error is None
    assert result.return_value["rows"] == tiny_prepared.manifest["splits"]["train"]
    assert 0 < result.return_value["mine"] < result.return_value["rows"]


@pytest.mark.parametrize("kwargs", [{"split": "train"}, {"split": "train", "windows": True},
                                    {"split": "valid"}, {"split": "next"}])
def test_arrow_block_is_the_block_ray_builds(tiny_prepared, kwargs):
    """The feed's typed Arrow blocks are exactly what Ray's own (per-value inferring) conversion of
    the same numpy batch gives: same schema, same values, same tensor extension type."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    from idle_ray.data.pipeline import arrow_block
    from idle_ray.data.samples import build_samples
    table = pq.read_table(tiny_prepared.shard_files[0], columns=["user", "items"])
    batch = build_samples(table, max_history=4, **kwargs)
    got, ref = arrow_block(batch), BlockAccessor.batch_to_block(batch)
    assert got.schema == ref.schema
    assert got.equals(ref, check_metadata=True)


def _stream(ds, batch_size, seed):
    """Batches as a training worker takes them (RayContext.batches): seeded local shuffle buffer."""
    kw = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed}
    return [{k: v.tolist() for k, v in b.items()} for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy", **kw)]


def test_feed_gives_the_same_batches_in_the_same_order_as_before(ray_local, tiny_prepared, monkeypatch):
    """Same seed -> the same batches, in the same order, as the feed before typed Arrow blocks (Ray
    converting the numpy dicts itself), for pre-training windows (seeded file order), adapter samples
    (seeded global shuffle) with a Holdout and two ranks; and the same samples as the single-process reader."""
    import ray.data

    from idle_ray.data import pipeline
    from idle_ray.data.samples import Holdout, build_samples
    ctx = ray.data.DataContext.get_current()
    was = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # as the training ingest (launch.ingest_options)
    try:
        cases = [dict(windows=True, seed=3, rank=1, world=2),
                 dict(seed=5, holdout=Holdout(2, 4, seed=5, adapter=True), rank=0, world=2),
                 dict(seed=7)]
        for case in cases:
            new = _stream(pipeline.split_dataset(tiny_prepared, "train", 4, **case), 8, 11)
            with monkeypatch.context() as m:
                # the old feed: the stage returned numpy dicts and Ray converted them (looked up on
                # the driver when the dataset is built, so the change reaches the tasks)
                m.setattr(pipeline, "sample_block", build_samples)
                old = _stream(pipeline.split_dataset(tiny_prepared, "train", 4, **case), 8, 11)
            assert new and new == old, case
        flat = sorted(zip(*[sum((b[k] for b in new), []) for k in ("user", "target")]))
        ref = list(local_numpy_reader(tiny_prepared, "train", 4))
        assert flat == sorted(zip(*[np.concatenate([r[k] for r in ref]).tolist() for k in ("user", "target")]))
    finally:
        ctx.execution_options.preserve_order = was


def _rows(batches):
    """Samples of a stream as comparable tuples, in stream order."""
    return [(u, t, tuple(h)) for b in batches for u, t, h in zip(b["user"].tolist(), b["target"].tolist(),
                                                                b["history"].tolist())]


@pytest.mark.parametrize("kwargs", [{}, {"windows": True}, {"targets_per_user": 2},
                                    {"holdout": "drawn"}])
def test_sequence_feed_gives_each_rank_its_samples_in_a_seeded_order(ray_local, tiny_prepared, kwargs):
    """The training feed (sequences through Ray Data, windowed by the consumer): each rank of two gets
    exactly its users' samples (``user % 2``), both together the single-process reader's; a seed gives
    the same batches however the blocks arrive (no order preservation), another seed another order;
    without a seed, the local reader's samples in order, re-batched."""
    from dataclasses import replace

    from idle_ray.data.feed import Windowing, sample_batches, seeded_batches, shuffled_batches
    from idle_ray.data.pipeline import sequence_dataset
    from idle_ray.data.samples import Holdout, build_samples
    if kwargs.get("holdout") == "drawn":
        kwargs = {"holdout": Holdout(2, 4, seed=5, adapter=True)}
    spec = Windowing("train", 4, **kwargs)
    blocks = lambda: sequence_dataset(tiny_prepared).iter_batches(batch_size=None, batch_format="pyarrow")  # noqa: E731
    import pyarrow.parquet as pq
    tables = [pq.read_table(f, columns=["user", "items"]) for f in tiny_prepared.shard_files]
    local = [build_samples(t, "train", 4, spec.targets_per_user, spec.windows, holdout=spec.holdout) for t in tables]
    ranks = [_rows(sample_batches(blocks(), spec.for_rank(r, 2), 8, seed=11)) for r in range(2)]
    assert all(u % 2 == r for r in range(2) for u, _, _ in ranks[r]) and all(ranks)
    assert sorted(ranks[0] + ranks[1]) == sorted(_rows(local))
    assert len(ranks[0]) + len(ranks[1]) == len(_rows(local))
    assert _rows(sample_batches(reversed(tables), spec.for_rank(0, 2), 8, seed=11, users=3)) == ranks[0]
    assert _rows(sample_batches(blocks(), spec.for_rank(0, 2), 8, seed=12)) != ranks[0]
    # world size 1 with a seed: exactly the standalone worker's order (LocalContext)
    whole = {k: np.concatenate([p[k] for p in local]) for k in local[0]}
    assert _rows(sample_batches(blocks(), spec, 8, seed=11)) == _rows(shuffled_batches(whole, 8, 11))
    ordered = list(sample_batches(reversed(tables), spec, 5, users=3))
    assert all(len(b["target"]) == 5 for b in ordered[:-1]) and _rows(ordered) == _rows(local[::-1])
    # A shuffle buffer smaller than the share: consecutive runs of 16 samples of the stream, each
    # shuffled, the batches full; the standalone worker's order for the same stream
    small = replace(spec.for_rank(0, 2), shuffle_samples=19)  # rounded down to 2 batches of 8
    stream = _rows(sample_batches(tables, small, 8))
    runs = _rows(sample_batches(tables, small, 8, seed=11, users=3))
    assert len(stream) > 32 and len(runs) == len(stream) and runs != stream
    assert all(sorted(runs[i:i + 16]) == sorted(stream[i:i + 16]) for i in range(0, len(stream), 16))
    assert all(len(b["target"]) == 8 for b in list(sample_batches(tables, small, 8, seed=11))[:-1])
    mine = [{k: v[v_rank] for k, v in p.items()} for p in local for v_rank in [p["user"] % 2 == 0]]
    assert _rows(seeded_batches(mine, 8, 11, 19)) == runs
