"""DeepSpeed engine over the trainable parameters of a (mostly frozen) model.

One place builds the DeepSpeed config from plain arguments: ZeRO stage 0-3, bf16 on GPU, a
torch AdamW as the client optimizer (DeepSpeed wraps it in its ZeRO optimizer), or - when
optimizer offload is asked for - DeepSpeed's own optimizer set in the config (ZeRO-Offload
needs DeepSpeed's CPU Adam). The frozen parameters never reach the optimizer: only the ones
the model's ``is_trainable`` predicate selects are passed as ``model_parameters``.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn


def deepspeed_config(*, micro_batch_size: int, zero_stage: int, bf16: bool = False, offload_optimizer: bool = False,
                     lr: float = 1e-3, weight_decay: float = 0.0, grad_clip: float = 1.0,
                     bucket_size: int = 50_000_000) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage > 0:
        # Few trainable parameters: one bucket holds them all, so each step is one collective.
        zero.update({"contiguous_gradients": True, "overlap_comm": False,
                     "reduce_bucket_size": bucket_size, "allgather_bucket_size": bucket_size})
    if zero_stage == 3:
        # Keep small (adapter-sized) parameters whole on every rank instead of gathering them.
        zero.update({"stage3_param_persistence_threshold": 1_000_000, "stage3_prefetch_bucket_size": bucket_size})
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        if zero_stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}
    return cfg


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then constant or cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, trainable: list[nn.Parameter], *, micro_batch_size: int, zero_stage: int,
                 lr: float, weight_decay: float = 0.0, warmup_steps: int = 0, bf16: bool = False,
                 offload_optimizer: bool = False, grad_clip: float = 1.0, total_steps: int = 0,
                 schedule: str = "constant"):
    """``(engine, optimizer, scheduler)``; torch.distributed must already be initialised.

    The lr follows :func:`lr_factor` (``total_steps``: the run's optimiser steps, for the cosine)."""
    import deepspeed

    cfg = deepspeed_config(micro_batch_size=micro_batch_size, zero_stage=zero_stage, bf16=bf16,
                           offload_optimizer=offload_optimizer, lr=lr, weight_decay=weight_decay,
                           grad_clip=grad_clip)
    optimizer = None if offload_optimizer else torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = None
    if (warmup_steps > 0 or schedule != "constant") and optimizer is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                         schedule=schedule))
    engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                 lr_scheduler=scheduler, config=cfg,
                                                 dist_init_required=False)
    return engine, opt, sched


def init_single_process_group() -> None:
    """World size 1 for the standalone worker (profiling without Ray)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
