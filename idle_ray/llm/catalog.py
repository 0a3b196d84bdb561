"""What each backbone is, for figures and tables: its name there, its kind and its size (no weights loaded)."""
from __future__ import annotations

import json
from pathlib import Path

from idle_ray.llm.backbone import ENCODER_MODEL_TYPES

# alias -> (name in figures, kind, parameters of the base model as load_backbone returns it; measured,
# and checked against the real load by tests/test_backbone.py and tests/test_split_backbones.py)
BACKBONES = {
    "smollm2-135m": ("SmolLM2-135M", "decoder", 134_515_008),
    "gemma3-270m": ("Gemma-3-270m", "decoder", 268_098_176),
    "minilm-l6": ("all-MiniLM-L6-v2", "encoder", 22_713_216),
    "mpnet-base": ("all-mpnet-base-v2", "encoder", 109_486_464),
    "smollm2-135m-random": ("SmolLM2-135M (random weights)", "decoder", 134_515_008),
    "tiny-decoder": ("tiny Llama", "decoder", None),
    "tiny-gpt2": ("tiny GPT-2", "decoder", None),
    "tiny-encoder": ("tiny BERT", "encoder", None),
}
KIND_ORDER = ("decoder", "encoder", "other")


def describe_backbone(name: str) -> dict:
    """``{"name", "label", "kind", "parameters"}`` of a backbone alias; a local model folder is named by
    its folder, its kind read from its ``config.json`` (``"other"`` where that cannot be read, e.g. results
    recomputed on a machine without the folder), its size unknown (None)."""
    if name in BACKBONES:
        label, kind, parameters = BACKBONES[name]
        return {"name": name, "label": label, "kind": kind, "parameters": parameters}
    kind = "other"
    try:
        model_type = json.loads((Path(name).expanduser() / "config.json").read_text())["model_type"]
        kind = "encoder" if model_type in ENCODER_MODEL_TYPES else "decoder"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"name": name, "label": Path(name).name or name, "kind": kind, "parameters": None}


def figure_order(names: list[str]) -> list[dict]:
    """:func:`describe_backbone` of each name, grouped by kind (decoders, encoders, others), smallest first
    within a kind (unknown sizes last), ties in the given order."""
    described = [describe_backbone(n) for n in names]
    return sorted(described, key=lambda d: (KIND_ORDER.index(d["kind"]), d["parameters"] is None,
                                            d["parameters"] or 0))


def size_label(parameters: int | None) -> str:
    """``22.7M`` / ``268M`` / ``1.3B``; empty when unknown."""
    if parameters is None:
        return ""
    if parameters >= 1e9:
        return f"{parameters / 1e9:.1f}B"
    return f"{parameters / 1e6:.1f}M" if parameters < 1e8 else f"{parameters / 1e6:.0f}M"
