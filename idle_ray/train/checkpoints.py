"""Training checkpoints: their file names, saving one, and the one checkpoint every rank resumes from.

A checkpoint folder holds DeepSpeed's state under ``DS_TAG`` (every rank's optimizer shard; frozen
weights are never written), the trainable weights ``CKPT_WEIGHTS`` and the best ones so far
``best_`` + ``CKPT_WEIGHTS`` (safetensors), and the loop's state ``CKPT_META`` (JSON).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

from idle_ray.train import manifests, storage

CKPT_META = "train_state.json"
# Ray Train V2's record of a run's registered checkpoints (in the run folder): on resume it hands
# the workers its `latest_checkpoint_result`, whatever newer folders a killed driver left behind.
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
CKPT_WEIGHTS = "trainable.safetensors"
DS_TAG = "deepspeed"


def save_checkpoint(engine, model, state: dict, rank: int, weights_meta: dict[str, str],
                    parent: str | None = None) -> str:
    """A temp folder (in ``parent``: the worker's scratch folder) with this rank's part of the
    checkpoint (rank 0 adds weights and state)."""
    from safetensors.torch import save_file
    d = tempfile.mkdtemp(prefix="idle_ray_ckpt_", dir=parent)
    # Every rank writes its optimizer shard; frozen weights are never written.
    engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        sd = trainable_state(engine, model)
        save_file(sd, os.path.join(d, CKPT_WEIGHTS), metadata=weights_meta)
        with open(os.path.join(d, CKPT_META), "w") as f:
            json.dump(state, f)
    return d


def trainable_state(engine, model) -> dict:
    """Trainable tensors (full names), gathered when ZeRO-3 partitions them."""
    names = [n for n, p in model.named_parameters() if model.is_trainable(n)]
    params = [p for n, p in model.named_parameters() if model.is_trainable(n)]
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().cpu().clone().contiguous() for n, p in zip(names, params)}
    state = model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if model.is_trainable(k)}


def registered(run_dir: str) -> tuple[str | None, list[str]]:
    """``(latest, all)`` checkpoint folder names Ray Train registered for ``run_dir`` (its snapshot),
    ``all`` oldest first; ``(None, [])`` when nothing is registered yet.

    Ray registers a checkpoint once every rank's upload returned (each rank checks its files on
    storage and writes its manifest last, :func:`idle_ray.train.manifests.publish`), and a resume
    still checks the one it picks is complete (:func:`choose_checkpoint`). A folder Ray did not
    register (an upload cut by a storage outage, a driver killed before registration) is never
    resumed from. A storage outage is waited out (:func:`idle_ray.train.storage.patiently`), never
    read as "no checkpoint"."""
    where = storage.join(run_dir, TRAIN_SNAPSHOT)
    try:
        snap = json.loads(storage.patiently(lambda: storage.read_bytes(where), f"reading {where}"))
        latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        names = [r.get("checkpoint_dir_name") for r in snap.get("checkpoint_results") or []]
    except (FileNotFoundError, ValueError, AttributeError):
        return None, []
    return latest or None, [n for n in names if n]


def candidate_checkpoints(latest, run_dir: str | None) -> list:
    """Latest first, then the run's other registered checkpoints (newest first), as
    ``ray.train.Checkpoint``s on the run's filesystem: a local folder, NFS or a URI alike."""
    from ray.train import Checkpoint
    out = [latest]
    if run_dir:
        fs, _ = storage.resolve(run_dir)
        latest_name = os.path.basename(latest.path.rstrip("/"))
        out += [Checkpoint(storage.resolve(storage.join(run_dir, name))[1], filesystem=fs)
                for name in reversed(registered(run_dir)[1]) if name != latest_name]
    return out


def registered_latest(run_dir: str):
    """The checkpoint Ray Train gives the workers when ``run_dir`` resumes (the latest one its snapshot
    registered), as a ``ray.train.Checkpoint``; ``None`` when the run would start from scratch.

    A checkpoint folder can be on disk without being registered: the driver died after the workers
    uploaded it and before Train recorded it. Train then resumes from the previous one."""
    from ray.train import Checkpoint
    name = registered(run_dir)[0]
    if not name:
        return None
    fs, path = storage.resolve(storage.join(run_dir, name))
    return Checkpoint(path, filesystem=fs)


def resume_state(run_dir: str) -> tuple[str, dict] | None:
    """``(checkpoint location, loop state)`` of the checkpoint a resumed run loads (what
    :func:`try_restore` picks on rank 0, read only), or ``None`` when it starts from scratch."""
    latest = registered_latest(run_dir)
    if latest is None:
        return None
    candidates = candidate_checkpoints(latest, run_dir)
    index = choose_checkpoint(candidates)
    if index is None:
        return None
    cand = candidates[index]
    return storage.uri(cand.filesystem, cand.path), _read_state(cand)


def _read_state(cand) -> dict:
    def read():
        with cand.filesystem.open_input_stream(os.path.join(cand.path, CKPT_META)) as f:
            return f.read()
    return json.loads(storage.patiently(read, f"reading {cand.path}/{CKPT_META}"))


def choose_checkpoint(candidates: list) -> int | None:
    """Index of the first candidate whose state can be read and that is complete (DeepSpeed's folder,
    every rank's manifest and the files it lists: :mod:`idle_ray.train.manifests`), a warning for each
    one passed over; ``None`` when there is none. Reads only, loads nothing.
    Storage that does not answer is waited for (``StorageUnavailable`` after its patience)."""
    import pyarrow.fs as pafs
    for i, cand in enumerate(candidates):
        try:
            state = _read_state(cand)
            missing = [k for k in ("epoch", "step") if k not in state]  # the resume record needs both
            if missing:
                raise KeyError(missing[0])
            ds = os.path.join(cand.path, DS_TAG)
            info = storage.patiently(lambda: cand.filesystem.get_file_info(ds), f"reading {ds}")
            if info.type != pafs.FileType.Directory:
                raise FileNotFoundError(f"no {DS_TAG} folder")
            manifests.require_complete(cand.filesystem, cand.path)  # every rank's files, not only rank 0's
            return i
        except storage.StorageUnavailable:
            raise  # an outage says nothing about this checkpoint: no fallback to an older one
        except Exception as e:  # noqa: BLE001 - a corrupt checkpoint of any kind: fall back
            warnings.warn(f"checkpoint {cand.path} could not be loaded ({type(e).__name__}: {e}); trying an older one")
    return None


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would run code when unpickled: the run refuses to resume from it."""


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's checkpoints pickle besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_pickles(folder: str) -> None:
    """Unpickle every ``*.pt`` under ``folder`` with torch's weights-only unpickler (tensors,
    containers and :func:`deepspeed_safe_globals` only) before DeepSpeed loads them with the full
    one (it passes ``weights_only=False``): a file that would call anything else (a planted
    ``__reduce__``) raises :class:`UnsafeCheckpointError`, and nothing in it runs."""
    import pickle

    import torch
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            try:
                with torch.serialization.safe_globals(deepspeed_safe_globals()):
                    torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line
                               or "global" in line.lower()), str(e).splitlines()[0] if str(e) else "")
                raise UnsafeCheckpointError(
                    f"{os.path.relpath(path, folder)} in the checkpoint would run code when unpickled ({detail[:300]}); "
                    "refusing to resume from it. Fix: delete that checkpoint (or the run folder) and check who "
                    "can write to train.storage_path") from None


def _from_rank0(value, world: int):
    """Rank 0's ``value`` on every rank (as it is without a process group or with one rank)."""
    import torch.distributed as dist
    if dist.is_initialized() and world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def try_restore(engine, ctx, run_dir: str | None, best_keep: str) -> dict | None:
    """Load the checkpoint rank 0 chose (the latest readable one; older ones with a warning) on
    every rank, so all ranks resume from the same epoch; a rank that cannot load it raises."""
    latest = ctx.get_checkpoint()
    if latest is None:
        return None
    candidates = candidate_checkpoints(latest, run_dir)
    chosen = None
    if ctx.rank == 0:
        index = choose_checkpoint(candidates)
        chosen = (index, None if index is None else candidates[index].path)
    index, path = _from_rank0(chosen, ctx.world)
    if index is None:
        raise RuntimeError("no readable checkpoint to resume from; delete the run folder to start over")
    cand = candidates[index] if index < len(candidates) else None
    if cand is None or cand.path != path:
        raise RuntimeError(f"rank {ctx.rank} does not see rank 0's checkpoint {path} among its candidates "
                           f"{[c.path for c in candidates]}")
    # A private copy (a remote checkpoint is downloaded, a local one copied): what is verified below
    # is what DeepSpeed loads, whoever else can write to the storage.
    with tempfile.TemporaryDirectory(prefix="idle_ray_resume_") as d:
        storage.patiently(lambda: cand.to_directory(d), f"downloading {cand.path}")
        verify_pickles(d)
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
