"""Exported ID-model artifacts: safetensors weights + JSON metadata (never pickle).

Folder layout::

    model.safetensors   the ID model's state dict
    model.json          {name, kwargs, num_items, vocab_fingerprint, data_fingerprint, metrics, ...}
    item_table.safetensors   {"item_table": (N+1, d)} for the adapter and for inspection

Loading checks the vocabulary fingerprint: an ID model is only meaningful with the item ids it
was trained on, so loading it against another dataset's vocabulary is an error.

The folder may be a URI (``s3://``, ``gs://``; :mod:`idle_ray.locations`): it is then written
locally and uploaded with its completeness marker last, and read from there by every process.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load, save_file
from torch import nn

from idle_ray import locations
from idle_ray.build_once import COMPLETE_MARKER, mark_complete
from idle_ray.models.registry import build_id_model

FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """The artifact is missing, malformed, or belongs to another vocabulary."""


def save_id_artifact(model: nn.Module, path: str | Path, *, name: str, kwargs: dict, vocab_fingerprint: str,
                     data_fingerprint: str = "", extra: dict | None = None) -> Path | str:
    """Write the artifact atomically (temp folder + rename, replacing an older one; for a URI,
    upload with the marker last)."""
    remote = locations.is_uri(path)
    final = str(path) if remote else Path(path)
    if not remote:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{locations.basename(final)}-", dir=None if remote else final.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        with torch.no_grad():
            save_file({"item_table": model.item_table().detach().cpu().contiguous()},
                      str(tmp / "item_table.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "name": name, "kwargs": kwargs,
                "num_items": int(model.num_items), "vocab_fingerprint": vocab_fingerprint,
                "data_fingerprint": data_fingerprint, **(extra or {})}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str))
        mark_complete(tmp)
        if remote:
            locations.upload_folder(tmp, final, last=COMPLETE_MARKER)
            shutil.rmtree(tmp, ignore_errors=True)
        elif final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_id_metadata(path: str | Path) -> dict:
    p = locations.join(str(path), "model.json")
    if not locations.exists(p):
        raise ArtifactError(f"{p}: no ID-model artifact here; run jobs/pretrain.py first or fix id_model.artifact")
    meta = json.loads(locations.read_bytes(p))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{p}: artifact format {meta.get('format_version')} != {FORMAT_VERSION}; re-export it")
    return meta


def load_id_artifact(path: str | Path, expected_vocab_fingerprint: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model from the artifact; it comes back frozen and in eval mode."""
    meta = read_id_metadata(path)
    if expected_vocab_fingerprint is not None and meta["vocab_fingerprint"] != expected_vocab_fingerprint:
        raise ArtifactError(
            f"{locations.join(str(path), 'model.json')}: field 'vocab_fingerprint' = {meta['vocab_fingerprint']} "
            f"does not match "
            f"the dataset's vocabulary ({expected_vocab_fingerprint}); this ID model was trained on other item ids. "
            f"Fix: pre-train an ID model on this dataset (jobs/pretrain.py) or point id_model.artifact at the right one")
    model = build_id_model(meta["name"], meta["num_items"], **meta["kwargs"])
    model.load_state_dict(load(locations.read_bytes(locations.join(str(path), "model.safetensors"))))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta
