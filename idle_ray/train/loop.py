"""The training loop every worker runs: steps in lockstep, validation each epoch, logs, checkpoints, resume."""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch

from idle_ray.config import ExperimentConfig
from idle_ray.train import storage
from idle_ray.train.checkpoints import CKPT_WEIGHTS, save_checkpoint, trainable_state, try_restore
from idle_ray.train.scratch import scratch_folder
from idle_ray.train.steps import make_engine, train_step, worker_device
from idle_ray.train.validation import evaluate_split
from idle_ray.train.weights import weights_metadata

SCRATCH_PREFIX = "idle_ray_worker_"  # this worker's best weights and checkpoints in flight


def tb_name(key: str) -> str:
    return key.replace("@", "_at_")


def train_rows(cfg: ExperimentConfig, prepared, pretrain: bool, world: int = 1) -> list[int]:
    """Training samples of each rank's share (users ``user % world == rank``), ranks ``0..world-1``."""
    from idle_ray.data.pipeline import sample_counts
    windows = pretrain and cfg.pretrain.sample_mode == "window"
    from idle_ray.train.builders import train_selection
    targets, holdout = train_selection(cfg, pretrain)
    return sample_counts(prepared, "train", cfg.data.max_history, targets, windows=windows, holdout=holdout,
                         world=world)


def in_step(batches, world: int, device):
    """Batches while *every* rank still has one: ranks' shares differ by a few samples, and a rank
    that stepped alone would wait forever in the gradient collective. One tiny all-reduce a step."""
    import torch.distributed as dist
    it = iter(batches)
    while True:
        batch = next(it, None)
        if world > 1:
            flag = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not int(flag.item()):
                return
        elif batch is None:
            return
        yield batch


def validation_protocols(cfg: ExperimentConfig) -> list[str]:
    """``full`` always (the reported ``val_*`` metrics), plus ``eval.select_protocol`` when it differs."""
    return ["full"] + ([cfg.eval.select_protocol] if cfg.eval.select_protocol != "full" else [])


def _selection_metric(cfg: ExperimentConfig, val: dict, metric: str) -> float:
    """Validation ``metric`` under ``eval.select_protocol`` (0 when absent)."""
    return val.get(metric if cfg.eval.select_protocol == "full" else f"{cfg.eval.select_protocol}_{metric}", 0.0)


def selection_score(cfg: ExperimentConfig, val: dict) -> float:
    """Validation NDCG@10 under ``eval.select_protocol``: what early stopping and selection compare."""
    return _selection_metric(cfg, val, "ndcg@10")


def selection_hr10(cfg: ExperimentConfig, val: dict) -> float:
    """Validation HR@10 under ``eval.select_protocol``, printed next to the NDCG@10 selection uses."""
    return _selection_metric(cfg, val, "hr@10")


def selection_label(cfg: ExperimentConfig) -> str:
    return "" if cfg.eval.select_protocol == "full" else f" ({cfg.eval.select_protocol})"


def validate_before_training(engine, model, ctx, cfg: ExperimentConfig, device, state: dict, best_keep: str,
                             weights_meta: dict[str, str]) -> None:
    """Validation before the first update: with score fusion this is the ID model's own ranking,
    which selection keeps (its weights become the best so far) when training does not beat it."""
    val = evaluate_split(engine.module, ctx, "valid", cfg.eval.batch_size, validation_protocols(cfg), cfg.seed,
                         device, max_users=cfg.train.eval_max_users)
    state.update(best=selection_score(cfg, val), best_epoch=0, best_step=0)
    # Kept apart from "history" (the reported epochs, which a restored Tune trial re-reports).
    state["start"] = {"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in val.items()}}
    initial = trainable_state(engine, model)  # collective under ZeRO-3: every rank
    if ctx.rank == 0:
        from safetensors.torch import save_file
        save_file(initial, best_keep, metadata=weights_meta)
        print(f"[eval] epoch 0 (before training) val ndcg@10 {state['best']:.4f}{selection_label(cfg)} hr@10 "
              f"{selection_hr10(cfg, val):.4f}", flush=True)


def log_train(ctx, tb, state: dict, total_steps: int, batch_size: int, parts: dict, samples: int,
              seconds: float) -> None:
    """Rank 0's training log line (rate, loss parts, ETA) and its TensorBoard scalars."""
    if ctx.rank != 0:
        return
    rate = samples * ctx.world / max(seconds, 1e-9)
    eta = (total_steps - state["step"]) * batch_size * ctx.world / max(rate, 1e-9)
    print(f"[train] step {state['step']}/{total_steps} epoch {state['epoch']} "
          f"{rate:,.1f} samples/s " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()) +
          f" eta {eta / 60:.1f} min", flush=True)
    if tb:
        for k, v in parts.items():
            tb.add_scalar(f"train/{tb_name(k)}", v, state["step"])
        tb.add_scalar("train/samples_per_s", rate, state["step"])


def crash_once(run_dir: str) -> None:
    """Kill this worker process the first time (a marker in ``run_dir``): the fault-tolerance test."""
    marker = Path(run_dir) / "failed_once"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        # The controller collects reports by polling: give it time to register the
        # last checkpoint, so the test crashes *after* checkpoint N as it intends.
        time.sleep(5)
        os._exit(1)  # simulate a crashed worker process (fault-tolerance test)


def step_checkpoint(engine, model, ctx, state: dict, best_keep: str, weights_meta: dict) -> None:
    """A mid-epoch checkpoint (``train.checkpoint_every_steps``): the loop state with ``epoch_step``,
    the best weights so far when there are any; reported with ``step_checkpoint: 1`` and no
    validation (not forwarded to Tune, see :class:`idle_ray.tune.search.EpochReportCallback`)."""
    import torch.distributed as dist
    ckpt_dir = save_checkpoint(engine, model, state, ctx.rank, weights_meta, os.path.dirname(best_keep))
    if ctx.rank == 0 and os.path.exists(best_keep):
        shutil.copy(best_keep, os.path.join(ckpt_dir, "best_" + CKPT_WEIGHTS))
    ctx.report({"epoch": state["epoch"], "step": state["step"], "epoch_step": state["epoch_step"],
                "step_checkpoint": 1}, ckpt_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if dist.is_initialized() and ctx.world > 1:
        dist.barrier()


def train_loop(config: dict, ctx, cfg: ExperimentConfig, prepared, model) -> dict:
    """Train ``model`` for the run ``config`` describes (see ``worker``) -> the run's final numbers.
    The best weights so far and the checkpoints being reported are kept in this worker's scratch
    folder (:mod:`idle_ray.train.scratch`), removed when it returns or, if it is killed, by the
    next worker on the node."""
    with scratch_folder(SCRATCH_PREFIX) as keep:
        return _train_loop(config, ctx, cfg, prepared, model, os.path.join(keep, "best_" + CKPT_WEIGHTS))


def _train_loop(config: dict, ctx, cfg: ExperimentConfig, prepared, model, best_keep: str) -> dict:
    import torch.distributed as dist

    pretrain = config["task"] == "pretrain"
    hp = cfg.pretrain if pretrain else cfg.train
    tr = cfg.train
    device = worker_device(cfg)
    batch_size = hp.batch_size if not pretrain else max(1, hp.batch_size // ctx.world)
    epochs = hp.epochs
    # every rank stops when the smallest share is used up
    steps_per_epoch = math.ceil(min(train_rows(cfg, prepared, pretrain, ctx.world)) / batch_size)
    total_steps = steps_per_epoch * epochs if not tr.max_steps else min(tr.max_steps, steps_per_epoch * epochs)
    engine = make_engine(model, cfg, device, pretrain, batch_size, total_steps=total_steps)

    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "best_step": -1, "bad_epochs": 0,
             "history": []}
    restored = try_restore(engine, ctx, config.get("run_dir"), best_keep)
    weights_meta = weights_metadata(cfg, prepared, config["task"], config.get("id_artifact"))
    if restored:
        state = restored
        if ctx.rank == 0:
            print(f"[train] resumed at epoch {state['epoch']}, step {state['step']}", flush=True)

    if not restored and not pretrain and tr.validate_at_start and getattr(model, "fusion", "none") == "residual":
        validate_before_training(engine, model, ctx, cfg, device, state, best_keep, weights_meta)
    tb = None
    if ctx.rank == 0 and config.get("run_dir"):
        from tensorboardX import SummaryWriter
        tb_dir = storage.MirroredFolder(storage.join(config["run_dir"], "tensorboard"))  # a URI: synced per epoch
        tb = SummaryWriter(tb_dir.local)
    patience = cfg.pretrain.patience if pretrain else 10**9
    fail_at = config.get("fail_at_step")
    t_start, samples_seen = time.perf_counter(), 0
    timed = None
    done = state["step"] >= total_steps > 0 and bool(tr.max_steps)

    while state["epoch"] < epochs and not done and state["bad_epochs"] < patience:
        model.train()
        acc, steps_log = {}, 0  # loss parts summed over the steps since the last log line
        t_log, n_log = time.perf_counter(), 0
        t_epoch = t_log
        # A step checkpoint resumes mid-epoch: the epoch's stream is the same (seeded), its first
        # `epoch_step` batches were trained on already and are passed over.
        skip = state.get("epoch_step", 0)
        for index, batch in enumerate(in_step(ctx.batches("train", batch_size, seed=cfg.seed * 1000 + state["epoch"]),
                                              ctx.world, device)):
            if index < skip:
                continue
            out = train_step(engine, batch, device)
            state["step"] += 1
            state["epoch_step"] = index + 1
            n = len(batch["target"])
            if timed is None:  # throughput clock starts after the first step (warm-up: kernels, buckets)
                timed = {"t0": time.perf_counter(), "samples": 0, "tokens": 0}
            else:
                timed["samples"] += n * ctx.world
                timed["tokens"] += int(batch["attention_mask"].sum()) * ctx.world if "attention_mask" in batch else 0
                timed["t1"] = time.perf_counter()
            n_log += n
            steps_log += 1
            samples_seen += n
            for k, v in out.items():
                if v.dim() == 0:
                    acc[k] = acc.get(k, 0.0) + float(v.detach())
            if tr.checkpoint_every_steps and state["step"] % tr.checkpoint_every_steps == 0:
                step_checkpoint(engine, model, ctx, state, best_keep, weights_meta)
            if fail_at is not None and state["step"] == fail_at and ctx.rank == ctx.world - 1:
                crash_once(config["run_dir"])
            if state["step"] % tr.log_every == 0 or state["step"] == total_steps:
                log_train(ctx, tb, state, total_steps, batch_size, {k: v / steps_log for k, v in acc.items()},
                          n_log, time.perf_counter() - t_log)
                acc, steps_log, t_log, n_log = {}, 0, time.perf_counter(), 0
            if tr.max_steps and state["step"] >= tr.max_steps:
                done = True
                break
        state["epoch"] += 1
        state["epoch_step"] = 0
        val = evaluate_split(engine.module, ctx, "valid", cfg.eval.batch_size, validation_protocols(cfg), cfg.seed,
                             device, max_users=tr.eval_max_users if not pretrain else 0)
        score = selection_score(cfg, val)
        improved = score > state["best"]
        if improved:
            state.update(best=score, best_epoch=state["epoch"], best_step=state["step"], bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        epoch_seconds = time.perf_counter() - t_epoch
        metrics = {"epoch": state["epoch"], "step": state["step"], **{f"val_{k}": v for k, v in val.items()},
                   "best_val_ndcg@10": state["best"], "best_epoch": state["best_epoch"], "best_step": state["best_step"],
                   # wall of this epoch, its validation included (a resumed epoch: from the resume), and of
                   # every epoch so far, across resumes (the state travels in the checkpoint)
                   "epoch_seconds": epoch_seconds, "wall_seconds": state.get("wall_seconds", 0.0) + epoch_seconds,
                   "torch_threads": torch.get_num_threads(), "samples_per_s": samples_seen * ctx.world /
                   max(time.perf_counter() - t_start, 1e-9)}
        state["wall_seconds"] = metrics["wall_seconds"]
        state["history"].append({k: v for k, v in metrics.items()})
        if tb:
            for k, v in val.items():
                tb.add_scalar(f"val/{tb_name(k)}", v, state["step"])
            tb.flush()
            tb_dir.sync()
        if ctx.rank == 0:
            print(f"[eval] epoch {state['epoch']} val ndcg@10 {score:.4f}{selection_label(cfg)} hr@10 "
                  f"{selection_hr10(cfg, val):.4f} (best {state['best']:.4f} @ {state['best_epoch']}) "
                  f"{metrics['epoch_seconds']:.0f} s", flush=True)
        # Checkpoint: every epoch (resume) and the best weights (selection on validation).
        ckpt_dir = save_checkpoint(engine, model, state, ctx.rank, weights_meta, os.path.dirname(best_keep))
        if ctx.rank == 0:
            # The latest checkpoint always carries the best weights so far (selection on validation).
            if improved:
                shutil.copy(os.path.join(ckpt_dir, CKPT_WEIGHTS), best_keep)
            shutil.copy(best_keep, os.path.join(ckpt_dir, "best_" + CKPT_WEIGHTS))
        ctx.report(metrics, ckpt_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if dist.is_initialized() and ctx.world > 1:
            dist.barrier()
    if tb:
        tb.close()
        tb_dir.sync()
    out = {"epoch": state["epoch"], "step": state["step"], "best_val_ndcg@10": state["best"],
           "best_epoch": state["best_epoch"], "best_step": state.get("best_step", -1)}
    if timed and "t1" in timed:  # this run's training steps (data feed included; evaluation excluded)
        seconds = timed["t1"] - timed["t0"]
        out.update(train_samples_per_s=timed["samples"] / seconds, train_tokens_per_s=timed["tokens"] / seconds)
    return out
