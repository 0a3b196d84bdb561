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
