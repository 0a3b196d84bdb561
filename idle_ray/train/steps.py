"""The worker's device, its DeepSpeed engine built from the config, and one optimisation step."""
from __future__ import annotations

import torch

from idle_ray.config import ExperimentConfig
from idle_ray.train.contexts import to_tensors
from idle_ray.train.engine import build_engine

PRECISIONS = ("fp32", "bf16", "bf16-frozen")


def worker_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_engine(model, cfg: ExperimentConfig, device: torch.device, pretrain: bool, batch_size: int,
                zero_stage: int | None = None, precision: str | None = None, total_steps: int = 0):
    """The loop's DeepSpeed engine over the trainable parameters (``model.is_trainable``).

    ``precision``: ``"fp32"``; ``"bf16"`` — DeepSpeed's bf16 mode (it casts the whole module to
    bf16 and keeps fp32 master weights of the trainable part in its optimizer); ``"bf16-frozen"``
    — frozen parameters cast to bf16 here, trainable ones stay fp32 in a plain fp32 engine (the
    frozen LLM has no optimizer state, so DeepSpeed's bf16 machinery buys nothing for it).
    Default: ``"bf16-frozen"`` for adapters on GPU (``"bf16"`` under ZeRO-3, which partitions
    every parameter and wants one dtype), else ``"fp32"``. ``zero_stage`` overrides the config's
    stage (benchmarks compare them).
    """
    hp = cfg.pretrain if pretrain else cfg.train
    if zero_stage is None:
        zero_stage = 0 if pretrain else cfg.train.zero_stage
    if precision is None:
        precision = "fp32" if device.type != "cuda" or pretrain else "bf16" if zero_stage == 3 else "bf16-frozen"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model.to(device)
    trainable = [p for n, p in model.named_parameters() if model.is_trainable(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(model.is_trainable(n))
        if precision == "bf16-frozen" and not model.is_trainable(n):
            p.data = p.data.to(torch.bfloat16)
    engine, _, _ = build_engine(
        model, trainable, micro_batch_size=batch_size, zero_stage=zero_stage,
        lr=hp.lr, weight_decay=hp.weight_decay, warmup_steps=0 if pretrain else cfg.train.warmup_steps,
        bf16=precision == "bf16", offload_optimizer=False if pretrain else cfg.train.offload_optimizer,
        total_steps=total_steps, schedule="constant" if pretrain else cfg.train.lr_schedule)
    return engine


def train_step(engine, batch: dict, device: torch.device) -> dict:
    """One optimisation step on a numpy batch: forward, backward, optimizer step -> the model's outputs."""
    t = to_tensors(batch, device)
    out = engine(t)
    engine.backward(out["loss"])
    engine.step()
    return out
