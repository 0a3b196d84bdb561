"""The worker function shared by pre-training, adapter training and Tune trials (house rule 5).

``train_fn_per_worker(config)`` runs on every Ray Train worker: it builds the task (an ID model
for pre-training, or frozen LLM + frozen ID model + adapter), wraps the trainable parameters in
a DeepSpeed engine, streams batches from ``ray.train.get_dataset_shard("train")``, evaluates on
validation every epoch (each worker scores its share of users; sums are all-reduced, so the
metrics are exact), and checkpoints the trainable part + optimiser/scheduler/step state through
``ray.train.report``; it resumes from ``ray.train.get_checkpoint()``.

``run_standalone(config)`` runs the same loop without Ray (world size 1) on the local Parquet
shards, for profiling on one GPU or debugging.

``config`` (plain, picklable): ``experiment`` (the ExperimentConfig as a dict), ``task``
("pretrain" | "adapter"), ``prepared`` (prepared dataset folder), ``id_artifact`` (adapter
task), ``run_dir`` (the run's folder or URI under ``train.storage_path``: TensorBoard logs,
older checkpoints to fall back to), optional ``fail_at_step`` (fault tests).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from idle_ray.config import ExperimentConfig, experiment_from_dict
from idle_ray.data.prepare import load_prepared
from idle_ray.eval.metrics import finalize, merge_sums, metric_sums
from idle_ray.eval.protocols import protocol_ranks
from idle_ray.train import storage
from idle_ray.train.checkpoint_names import CKPT_META, CKPT_WEIGHTS, DS_TAG


def tb_name(key: str) -> str:
    return key.replace("@", "_at_")


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


# ----------------------------------------------------------------------------- contexts

class RayContext:
    """Data and reporting through Ray Train."""

    def __init__(self):
        import ray.train
        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def batches(self, split: str, batch_size: int, seed: int | None = None):
        # Training: this rank's own dataset (users with user % world == rank, globally shuffled with a
        # fixed seed; see launch.run_training), so the stream is the same in every run.
        name = f"{split}_{self.rank}" if split == "train" else split
        shard = self.train.get_dataset_shard(name)
        kw = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed} if seed is not None else {}
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2, **kw)

    def get_checkpoint(self):
        return self.train.get_checkpoint()

    def report(self, metrics: dict, ckpt_dir: str | None):
        from ray.train import Checkpoint
        self.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)


class LocalContext:
    """World size 1, no Ray: the same samples from the local shards (and the same tokenisation)."""

    def __init__(self, prepared, cfg: ExperimentConfig, stage, out_dir: Path, windows: bool = False,
                 holdout: int = 0, targets: int = 0):
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
        block = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}
        n = len(block.get("target", ()))
        order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)  # global shuffle
        for lo in range(0, n, batch_size):
            idx = order[lo:lo + batch_size]
            b = {k: v[idx] for k, v in block.items()}
            yield self.stage(b) if self.stage else b

    def get_checkpoint(self):
        return None

    def report(self, metrics: dict, ckpt_dir: str | None):
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
        if ckpt_dir:
            dest = self.out_dir / f"checkpoint_{metrics['epoch']:04d}"
            shutil.copytree(ckpt_dir, dest, dirs_exist_ok=True)


# ----------------------------------------------------------------------------- evaluation

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


# ----------------------------------------------------------------------------- checkpoints

def _save_checkpoint(engine, model, state: dict, rank: int, weights_meta: dict[str, str]) -> str:
    from safetensors.torch import save_file
    d = tempfile.mkdtemp(prefix="idle_ray_ckpt_")
    # Every rank writes its optimizer shard; frozen weights are never written.
    engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        sd = _trainable_state(engine, model)
        save_file(sd, os.path.join(d, CKPT_WEIGHTS), metadata=weights_meta)
        with open(os.path.join(d, CKPT_META), "w") as f:
            json.dump(state, f)
    return d


def _trainable_state(engine, model) -> dict:
    """Trainable tensors (full names), gathered when ZeRO-3 partitions them."""
    names = [n for n, p in model.named_parameters() if model.is_trainable(n)]
    params = [p for n, p in model.named_parameters() if model.is_trainable(n)]
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().cpu().clone().contiguous() for n, p in zip(names, params)}
    state = model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if model.is_trainable(k)}


def _candidate_checkpoints(latest, run_dir: str | None) -> list:
    """Latest first, then older checkpoints of the same run (newest first), as ``ray.train.Checkpoint``s
    on the run's filesystem: a local folder, NFS or a URI alike."""
    from ray.train import Checkpoint
    out = [latest]
    if run_dir:
        fs, _ = storage.resolve(run_dir)
        latest_name = os.path.basename(latest.path.rstrip("/"))
        out += [Checkpoint(storage.resolve(c)[1], filesystem=fs) for c in storage.checkpoints(run_dir)
                if os.path.basename(c) != latest_name]
    return out


def _try_restore(engine, ctx, run_dir: str | None, best_keep: str) -> dict | None:
    """Load the latest readable checkpoint (older ones on failure, with a warning)."""
    latest = ctx.get_checkpoint()
    if latest is None:
        return None
    for cand in _candidate_checkpoints(latest, run_dir):
        try:
            with cand.as_directory() as d:  # a remote checkpoint is downloaded to a temp folder
                with open(os.path.join(d, CKPT_META)) as f:
                    state = json.load(f)
                engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
                best = os.path.join(d, "best_" + CKPT_WEIGHTS)
                if os.path.exists(best):
                    shutil.copy(best, best_keep)
            if cand is not latest:
                warnings.warn(f"latest checkpoint {latest.path} is unreadable; resumed from the older {cand.path}")
            state.setdefault("resumes", []).append({"epoch": state["epoch"], "step": state["step"],
                                                    "fallback": cand is not latest})
            return state
        except Exception as e:  # noqa: BLE001 - a corrupt checkpoint of any kind: fall back
            warnings.warn(f"checkpoint {cand.path} could not be loaded ({type(e).__name__}: {e}); trying an older one")
    raise RuntimeError("no readable checkpoint to resume from; delete the run folder to start over")


# ----------------------------------------------------------------------------- the loop

def _build_task(config: dict, cfg: ExperimentConfig, prepared):
    from idle_ray.train import builders
    if config["task"] == "pretrain":
        model, _ = builders.build_pretrain_task(cfg, prepared)
        return model
    return builders.build_adapter_task(cfg, prepared, config["id_artifact"])


def worker_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


PRECISIONS = ("fp32", "bf16", "bf16-frozen")


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
    from idle_ray.train.engine import build_engine
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


def train_rows(cfg: ExperimentConfig, prepared, pretrain: bool, rank: int = 0, world: int = 1) -> int:
    """Training samples of rank ``rank``'s share (users ``user % world == rank``)."""
    from idle_ray.data.pipeline import sample_count
    windows = pretrain and cfg.pretrain.sample_mode == "window"
    return sample_count(prepared, "train", cfg.data.max_history, 0 if pretrain else cfg.data.train_targets_per_user,
                        windows=windows, holdout=cfg.pretrain.holdout_targets if pretrain else 0,
                        rank=rank, world=world)


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


def train_step(engine, batch: dict, device: torch.device) -> dict:
    """One optimisation step on a numpy batch: forward, backward, optimizer step -> the model's outputs."""
    t = to_tensors(batch, device)
    out = engine(t)
    engine.backward(out["loss"])
    engine.step()
    return out


def _loop(config: dict, ctx, cfg: ExperimentConfig, prepared, model) -> dict:
    import torch.distributed as dist

    pretrain = config["task"] == "pretrain"
    hp = cfg.pretrain if pretrain else cfg.train
    tr = cfg.train
    device = worker_device(cfg)
    batch_size = hp.batch_size if not pretrain else max(1, hp.batch_size // ctx.world)
    epochs = hp.epochs
    steps_per_epoch = math.ceil(min(train_rows(cfg, prepared, pretrain, r, ctx.world) for r in range(ctx.world))
                                / batch_size)  # every rank stops when the smallest share is used up
    total_steps = steps_per_epoch * epochs if not tr.max_steps else min(tr.max_steps, steps_per_epoch * epochs)
    engine = make_engine(model, cfg, device, pretrain, batch_size, total_steps=total_steps)

    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "best_step": -1, "bad_epochs": 0,
             "history": []}
    best_keep = os.path.join(tempfile.mkdtemp(prefix="idle_ray_best_"), "best_" + CKPT_WEIGHTS)
    restored = _try_restore(engine, ctx, config.get("run_dir"), best_keep)
    from idle_ray.train.weights import weights_metadata
    weights_meta = weights_metadata(cfg, prepared, config["task"], config.get("id_artifact"))
    if restored:
        state = restored
        if ctx.rank == 0:
            print(f"[train] resumed at epoch {state['epoch']}, step {state['step']}", flush=True)

    if not restored and not pretrain and tr.validate_at_start and getattr(model, "fusion", "none") == "residual":
        # Validation before the first update: with score fusion this is the ID model's own ranking,
        # which selection keeps when training does not beat it on validation.
        val = evaluate_split(engine.module, ctx, "valid", cfg.eval.batch_size, ["full"], cfg.seed, device,
                             max_users=tr.eval_max_users)
        state.update(best=val.get("ndcg@10", 0.0), best_epoch=0, best_step=0)
        state["history"].append({"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in val.items()}})
        initial = _trainable_state(engine, model)  # collective under ZeRO-3: every rank
        if ctx.rank == 0:
            from safetensors.torch import save_file
            save_file(initial, best_keep, metadata=weights_meta)
            print(f"[eval] epoch 0 (before training) val ndcg@10 {state['best']:.4f} hr@10 "
                  f"{val.get('hr@10', 0):.4f}", flush=True)
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
        acc = {}
        t_log, n_log = time.perf_counter(), 0
        for batch in in_step(ctx.batches("train", batch_size, seed=cfg.seed * 1000 + state["epoch"]), ctx.world,
                             device):
            out = train_step(engine, batch, device)
            state["step"] += 1
            n = len(batch["target"])
            if timed is None:  # throughput clock starts after the first step (warm-up: kernels, buckets)
                timed = {"t0": time.perf_counter(), "samples": 0, "tokens": 0}
            else:
                timed["samples"] += n * ctx.world
                timed["tokens"] += int(batch["attention_mask"].sum()) * ctx.world if "attention_mask" in batch else 0
                timed["t1"] = time.perf_counter()
            n_log += n
            samples_seen += n
            for k, v in out.items():
                if v.dim() == 0:
                    acc[k] = acc.get(k, 0.0) + float(v.detach())
            if fail_at is not None and state["step"] == fail_at and ctx.rank == ctx.world - 1:
                marker = Path(config["run_dir"]) / "failed_once"
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text("1")
                    # The controller collects reports by polling: give it time to register the
                    # last checkpoint, so the test crashes *after* checkpoint N as it intends.
                    time.sleep(5)
                    os._exit(1)  # simulate a crashed worker process (fault-tolerance test)
            if state["step"] % tr.log_every == 0 or state["step"] == total_steps:
                dt = time.perf_counter() - t_log
                parts = {k: v / tr.log_every for k, v in acc.items()}
                if ctx.rank == 0:
                    rate = n_log * ctx.world / max(dt, 1e-9)
                    eta = (total_steps - state["step"]) * batch_size * ctx.world / max(rate, 1e-9)
                    print(f"[train] step {state['step']}/{total_steps} epoch {state['epoch']} "
                          f"{rate:,.1f} samples/s " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()) +
                          f" eta {eta / 60:.1f} min", flush=True)
                    if tb:
                        for k, v in parts.items():
                            tb.add_scalar(f"train/{tb_name(k)}", v, state["step"])
                        tb.add_scalar("train/samples_per_s", rate, state["step"])
                acc, t_log, n_log = {}, time.perf_counter(), 0
            if tr.max_steps and state["step"] >= tr.max_steps:
                done = True
                break
        state["epoch"] += 1
        val = evaluate_split(engine.module, ctx, "valid", cfg.eval.batch_size, ["full"], cfg.seed, device,
                             max_users=tr.eval_max_users if not pretrain else 0)
        score = val.get("ndcg@10", 0.0)
        improved = score > state["best"]
        if improved:
            state.update(best=score, best_epoch=state["epoch"], best_step=state["step"], bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        metrics = {"epoch": state["epoch"], "step": state["step"], **{f"val_{k}": v for k, v in val.items()},
                   "best_val_ndcg@10": state["best"], "best_step": state["best_step"],
                   "torch_threads": torch.get_num_threads(), "samples_per_s": samples_seen * ctx.world /
                   max(time.perf_counter() - t_start, 1e-9)}
        state["history"].append({k: v for k, v in metrics.items()})
        if tb:
            for k, v in val.items():
                tb.add_scalar(f"val/{tb_name(k)}", v, state["step"])
            tb.flush()
            tb_dir.sync()
        if ctx.rank == 0:
            print(f"[eval] epoch {state['epoch']} val ndcg@10 {score:.4f} hr@10 {val.get('hr@10', 0):.4f} "
                  f"(best {state['best']:.4f} @ {state['best_epoch']})", flush=True)
        # Checkpoint: every epoch (resume) and the best weights (selection on validation).
        ckpt_dir = _save_checkpoint(engine, model, state, ctx.rank, weights_meta)
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


def train_fn_per_worker(config: dict) -> dict:
    """Ray Train entry point (see module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = experiment_from_dict(config["experiment"])
    prepared = load_prepared(config["prepared"])
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    model = _build_task(config, cfg, prepared)
    return _loop(config, RayContext(), cfg, prepared, model)


def local_stage(task: str, cfg: ExperimentConfig, prepared):
    """The per-batch stage the Ray Data pipeline applies (prompt tokenisation for adapters), as a
    plain function for :class:`LocalContext`; ``None`` for pre-training."""
    if task != "adapter":
        return None
    from idle_ray.train.builders import encode_prompts, prompt_stage_kwargs
    kwargs = prompt_stage_kwargs(cfg, prepared)
    return lambda batch: encode_prompts(batch, **kwargs)


def run_standalone(config: dict) -> dict:
    """The same loop without Ray: world size 1, local shards, checkpoints under ``run_dir``."""
    from idle_ray.train.engine import init_single_process_group
    init_single_process_group()
    cfg = experiment_from_dict(config["experiment"])
    prepared = load_prepared(config["prepared"])
    model = _build_task(config, cfg, prepared)
    stage = local_stage(config["task"], cfg, prepared)
    out = Path(config.get("run_dir") or tempfile.mkdtemp(prefix="idle_ray_standalone_"))
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "run_dir": str(out)}
    pretrain = config["task"] == "pretrain"
    windows = pretrain and cfg.pretrain.sample_mode == "window"
    holdout = cfg.pretrain.holdout_targets if pretrain else 0
    targets = 0 if pretrain else cfg.data.train_targets_per_user
    return _loop(config, LocalContext(prepared, cfg, stage, out, windows, holdout, targets), cfg, prepared, model)
