"""Exact metrics of a split inside the training workers: each rank scores its users, sums are all-reduced."""
from __future__ import annotations

import numpy as np
import torch

from idle_ray.eval.metrics import finalize, merge_sums, metric_sums
from idle_ray.eval.protocols import protocol_ranks
from idle_ray.train.contexts import to_tensors


def evaluate_split(model, ctx, split: str, batch_size: int, protocols: list[str], seed: int,
                   device, max_users: int = 0) -> dict:
    """Exact metrics over the split: this worker scores users with ``user % world == rank``."""
    import torch.distributed as dist
    model_was_training = model.training
    model.eval()
    sums = {p: None for p in protocols}
    for batch in ctx.batches(split, batch_size):
        keep = (batch["user"] % ctx.world) == ctx.rank
        if max_users:
            keep &= batch["user"] <= max_users
        if not keep.any():
            continue
        batch = {k: v[keep] for k, v in batch.items()}
        t = to_tensors({k: v for k, v in batch.items() if k != "seen"}, device)
        with torch.no_grad():
            scores = model.full_sort_predict(t).float()
        for p in protocols:
            ranks = protocol_ranks(p, scores, t["target"].long(), list(batch["seen"]), user_ids=batch["user"], seed=seed)
            s = metric_sums(ranks)
            sums[p] = s if sums[p] is None else merge_sums(sums[p], s)
    out = {}
    for p in protocols:
        s = sums[p] or metric_sums(np.zeros(0))
        keys = sorted(s)
        vec = torch.tensor([s[k] for k in keys], dtype=torch.float64)
        if dist.is_initialized() and ctx.world > 1:
            dist.all_reduce(vec)
        total = dict(zip(keys, vec.tolist()))
        if total["count"] > 0:
            for k, v in finalize(total).items():
                out[k if p == "full" else f"{p}_{k}"] = v
        out["users" if p == "full" else f"{p}_users"] = int(total["count"])
    model.train(model_was_training)
    return out
