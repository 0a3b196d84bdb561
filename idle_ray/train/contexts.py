"""Where a training worker gets batches and reports to: Ray Train (``RayContext``) or nothing (``LocalContext``).

Both give the loop ``rank`` / ``world``, ``batches(split, batch_size, seed)``, ``get_checkpoint()``
and ``report(metrics, ckpt_dir)``; :func:`to_tensors` turns their numpy batches into tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from idle_ray.config import ExperimentConfig
from idle_ray.train.manifests import publish


def to_tensors(batch: dict, device) -> dict:
    """numpy batch -> tensors (ragged object columns such as ``seen`` stay numpy)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            v = v if v.flags.writeable else v.copy()  # Ray hands out read-only views
            out[k] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        else:
            out[k] = v
    return out


class RayContext:
    """Data and reporting through Ray Train.

    ``feeds``: ``{split: Windowing}`` for the datasets that carry user sequences
    (:func:`~idle_ray.data.pipeline.sequence_dataset`), windowed here into this rank's samples
    (:mod:`idle_ray.data.feed`); any other split's dataset carries samples already.
    """

    def __init__(self, feeds: dict | None = None):
        import ray.train
        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.feeds = {k: w.for_rank(self.rank, self.world) for k, w in (feeds or {}).items()}

    def batches(self, split: str, batch_size: int, seed: int | None = None):
        # Training: this rank's own dataset, so the stream is the same in every run (see launch.run_training).
        name = f"{split}_{self.rank}" if split == "train" else split
        shard = self.train.get_dataset_shard(name)
        if split in self.feeds:  # sequences: windowed here, a seeded global shuffle of this rank's share
            from idle_ray.data.feed import sample_batches
            blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
            yield from sample_batches(blocks, self.feeds[split], batch_size, seed)
            return
        kw = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed} if seed is not None else {}
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2, **kw)

    def get_checkpoint(self):
        return self.train.get_checkpoint()

    def report(self, metrics: dict, ckpt_dir: str | None):
        from ray.train import Checkpoint
        if not ckpt_dir:
            self.train.report(metrics)
            return

        def upload(checkpoint, name: str):
            # This rank's files, checked on storage, then its manifest (see manifests): Train registers the
            # checkpoint once every rank's upload returned, and a cut upload raises instead of passing.
            run = self.train.get_context().get_storage()
            dest = run.build_checkpoint_path_from_name(name)
            publish(checkpoint.path, run.storage_filesystem, dest, self.rank, self.world)
            return Checkpoint(dest, filesystem=run.storage_filesystem)
        self.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir), checkpoint_upload_fn=upload)


class LocalContext:
    """World size 1, no Ray: the same samples from the local shards (and the same tokenisation)."""

    def __init__(self, prepared, cfg: ExperimentConfig, stage, out_dir: Path, windows: bool = False,
                 holdout=0, targets: int = 0):
        self.rank, self.world = 0, 1
        self.windows, self.holdout, self.targets = windows, holdout, targets
        self.prepared, self.cfg, self.stage, self.out_dir = prepared, cfg, stage, out_dir

    def batches(self, split: str, batch_size: int, seed: int | None = None):
        from idle_ray.data.pipeline import local_numpy_reader
        d = self.cfg.data
        targets = self.targets if split == "train" else 0
        holdout = self.holdout if split == "train" else 0
        blocks = list(local_numpy_reader(self.prepared, split, d.max_history, targets, windows=self.windows,
                                         holdout=holdout))
        if not blocks:
            return
        if seed is not None:  # the Ray feed's seeded shuffle (the same batches as world size 1 there)
            from idle_ray.data.feed import seeded_batches
            batches = seeded_batches(blocks, batch_size, seed, d.shuffle_samples)
        else:
            block = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
            batches = ({k: v[lo:lo + batch_size] for k, v in block.items()}
                       for lo in range(0, len(block["target"]), batch_size))
        for b in batches:
            yield self.stage(b) if self.stage else b

    def get_checkpoint(self):
        return None

    def report(self, metrics: dict, ckpt_dir: str | None):
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
        if ckpt_dir:
            step = f"_step{metrics['step']:07d}" if metrics.get("step_checkpoint") else ""
            dest = self.out_dir / f"checkpoint_{metrics['epoch']:04d}{step}"
            publish(ckpt_dir, pafs.LocalFileSystem(), str(dest), 0, 1)
