"""Trained weights files: what they record about their run, and the checks before they are evaluated.

The worker writes the trainable part of every checkpoint as safetensors (never pickle) with
string metadata (:func:`weights_metadata`): the task, the item-vocabulary and data fingerprints,
a fingerprint of the frozen ID model the adapter was trained on, and the config fields that
define the adapter (its shapes, its backbone and its hard prompt). :func:`check_adapter_weights`
compares them with the config and data an evaluation is about to use, and refuses a file that
cannot belong to them with the file, the differing fields and the fix in one message, before any
model or actor is built. A file without this metadata (written by other tools) is checked by
loading it into the config's model on the driver.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from idle_ray.config import ConfigError, ExperimentConfig
from idle_ray.data.prepare import PreparedDataset
from idle_ray.locations import basename
from idle_ray.train import manifests, storage
from idle_ray.train.checkpoints import CKPT_WEIGHTS, registered

BEST_WEIGHTS = "best_" + CKPT_WEIGHTS
# Config fields that define a trained adapter: evaluating its weights under other values is an error.
ADAPTER_FIELDS = ("adapter.variant", "adapter.prompt_length", "adapter.projection_width", "adapter.refine_layers",
                  "adapter.refine_bottleneck", "adapter.fusion", "llm.backbone", "prompt.template", "id_model.name",
                  "id_model.hidden_size")


class WeightsError(ConfigError):
    """The weights file is missing, unreadable, or belongs to another config / vocabulary / ID model."""


def _field(cfg: ExperimentConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def id_model_fingerprint(id_artifact: str | Path) -> str:
    """Content hash of an ID-model artifact's weights (the frozen half of an adapter's input)."""
    return hashlib.sha256(storage.read_bytes(storage.join(str(id_artifact), "model.safetensors"))).hexdigest()[:16]


def weights_metadata(cfg: ExperimentConfig, prepared: PreparedDataset, task: str,
                     id_artifact: str | None = None) -> dict[str, str]:
    """safetensors metadata (str -> str) of a checkpoint's trainable weights."""
    meta = {"idle_ray.task": task, "idle_ray.vocab_fingerprint": prepared.manifest["vocab_fingerprint"],
            "idle_ray.data_fingerprint": prepared.fingerprint}
    if task == "adapter":
        meta["idle_ray.config"] = json.dumps({k: _field(cfg, k) for k in ADAPTER_FIELDS}, sort_keys=True)
        if id_artifact:
            meta["idle_ray.id_model_fingerprint"] = id_model_fingerprint(id_artifact)
    return meta


def load_weights(location: str) -> dict:
    """The tensors of a safetensors file at a path or URI."""
    from safetensors.torch import load
    return load(storage.read_bytes(location))


def read_weights_file(location: str) -> tuple[bytes, dict]:
    """``(file bytes, metadata)`` of a safetensors file (path or URI)."""
    try:
        found = storage.exists(location)
    except Exception as e:  # noqa: BLE001 - unknown scheme, unreachable endpoint, no credentials
        raise WeightsError(f"{location}: cannot read it ({storage.first_line(e)}). Fix: check the path, or for a "
                           f"URI the bucket, the credentials and AWS_ENDPOINT_URL") from None
    if not found:
        raise WeightsError(f"{location}: weights file not found. Fix: pass the {BEST_WEIGHTS} of a finished run "
                           f"(it is in the run's latest checkpoint_* folder under train.storage_path)")
    data = storage.read_bytes(location)
    try:  # safetensors layout: u64 little-endian header size, then the JSON header
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception:  # noqa: BLE001 - any parse failure means the same thing
        raise WeightsError(f"{location}: not a safetensors weights file. Fix: pass a run's {BEST_WEIGHTS}") from None
    return data, meta


def check_adapter_weights(location: str, cfg: ExperimentConfig, prepared: PreparedDataset, id_artifact: str) -> None:
    """Refuse adapter weights that do not belong to ``cfg`` + ``prepared`` + ``id_artifact``."""
    data, meta = read_weights_file(location)
    fix = "Fix: evaluate with the training run's config (its --config and --set values)"
    if "idle_ray.task" not in meta:
        _check_by_loading(location, data, cfg, prepared, id_artifact, fix)
        return
    if meta["idle_ray.task"] != "adapter":
        raise WeightsError(f"{location}: these are {meta['idle_ray.task']} weights, not an adapter's. Fix: evaluate "
                           f"the exported ID-model artifact instead (kind id_model)")
    mine = prepared.manifest["vocab_fingerprint"]
    if meta.get("idle_ray.vocab_fingerprint") != mine:
        raise WeightsError(f"{location}: trained on another item vocabulary (vocab_fingerprint "
                           f"{meta.get('idle_ray.vocab_fingerprint', '?')[:12]} != this dataset's {mine[:12]}). "
                           f"{fix}: the same data.* settings, so item ids mean the same items")
    trained = json.loads(meta.get("idle_ray.config", "{}"))
    diffs = {k: v for k, v in trained.items() if k in ADAPTER_FIELDS and _field(cfg, k) != v}
    if diffs:
        listed = "; ".join(f"{k} = {v!r} in the weights, {_field(cfg, k)!r} in the config" for k, v in diffs.items())
        sets = " ".join(f"--set {shlex.quote(f'{k}={v}')}" for k, v in diffs.items())
        raise WeightsError(f"{location}: trained with another config ({listed}). {fix}, e.g. {sets}")
    trained_id = meta.get("idle_ray.id_model_fingerprint")
    # (a missing artifact is reported by the artifact check, with its own fix)
    if trained_id and storage.exists(storage.join(str(id_artifact), "model.safetensors")) and \
            trained_id != id_model_fingerprint(id_artifact):
        raise WeightsError(f"{location}: trained on top of another ID model than {id_artifact} (weights "
                           f"fingerprint {trained_id} != {id_model_fingerprint(id_artifact)}). Fix: set "
                           f"id_model.artifact to the artifact the run was trained with")


def _check_by_loading(location: str, data: bytes, cfg: ExperimentConfig, prepared: PreparedDataset,
                      id_artifact: str, fix: str) -> None:
    from safetensors.torch import load

    from idle_ray.train.builders import build_adapter_task
    task = build_adapter_task(cfg, prepared, id_artifact)
    try:
        task.load_adapter_state_dict(load(data))
    except (KeyError, RuntimeError) as e:
        raise WeightsError(f"{location}: does not fit this config's adapter ({storage.first_line(e)}). {fix}") from None


def run_best_weights(storage_path: str, run_name: str) -> str:
    """Location of the best (validation-selected) weights of the run ``run_name`` under ``storage_path``,
    from its newest complete checkpoint: among those Ray Train registered (newest first), else among
    its checkpoint folders (a run without Ray); a folder that lacks a rank's manifest or file (an upload
    cut by a storage outage) is passed over (:mod:`idle_ray.train.manifests`)."""
    if storage.is_uri(storage_path):
        storage.check_uri(storage_path, write=False)
    run_dir = storage.join(storage_path, run_name)
    names = list(reversed(registered(run_dir)[1])) or [basename(c) for c in storage.checkpoints(run_dir)]
    passed_over = []
    for name in names:
        ckpt = storage.join(run_dir, name)
        gaps = manifests.missing(*storage.resolve(ckpt))
        if gaps:
            passed_over.append(f"{name} (incomplete: no {gaps[0]})")
            continue
        best = storage.join(ckpt, BEST_WEIGHTS)
        if storage.exists(best):
            return best
        passed_over.append(f"{name} (no {BEST_WEIGHTS})")
    runs = [r for r in storage.subfolders(storage_path) if storage.checkpoints(storage.join(storage_path, r))]
    what = "no complete checkpoint with best weights" if storage.exists(run_dir) else "no such run"
    seen = f" (passed over: {'; '.join(passed_over)})" if passed_over else ""
    raise WeightsError(f"{run_dir}: {what}{seen}. Runs with checkpoints under train.storage_path = {storage_path!r}: "
                       f"{', '.join(runs) or 'none'}. Fix: pass one of them, rerun the training command to resume "
                       f"it, or set train.storage_path to where the run was written")
