"""IDLE-Adapter: MMD numbers, hooks, frozen-stays-frozen, KV split = full forward, variants,
prompt layout/truncation/validation, checkpoint round trip. Tiny backbones only (fast)."""

import copy
import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from idle_ray.adapter.alignment import DimensionAlignment
from idle_ray.adapter.mmd import mmd2, mmd2_layers
from idle_ray.adapter.model import VARIANTS, IDLEModel
from idle_ray.adapter.refinement import (
    LayerwiseRefinement,
    capture_layer_inputs,
    inject_layer_inputs,
)
from idle_ray.adapter.trainable import is_trainable
from idle_ray.llm.backbone import load_backbone
from idle_ray.llm.prompts import PromptEncoder, split_template
from idle_ray.models.sasrec import SASRec

NUM_ITEMS = 20
TITLES = ["<pad>"] + [f"movie {i}" for i in range(1, NUM_ITEMS + 1)]
TEMPLATE = "A user watched: {history}. {id_tokens} Next is"
TINY = ["tiny-decoder", "tiny-gpt2", "tiny-encoder"]
# Figure 2's other architectures (Gemma-3, MPNet), tiny and random, built here: the real ones are optional
FAMILIES = ["tiny-gemma3", "tiny-mpnet"]
K = 3
# where each tiny block's own input goes first: a pre-hook there sees the layer input *after*
# the adapter's replacement (the adapter's own pre-hooks are registered later, run later)
FIRST_CHILD = {"tiny-decoder": "input_layernorm", "tiny-gpt2": "ln_1", "tiny-encoder": "attention",
               "tiny-gemma3": "input_layernorm", "tiny-mpnet": "attention"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_family(name):
    """A 2-layer random Gemma-3 (sliding window 16: shorter than the prompts) or MPNet, char tokenizer."""
    from transformers import AutoModel, Gemma3TextConfig, MPNetConfig

    from idle_ray.llm.backbone import wrap_backbone
    from idle_ray.llm.tiny import build_char_tokenizer
    tokenizer = build_char_tokenizer(add_cls_sep=name == "tiny-mpnet")
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if name == "tiny-gemma3":
        config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8, sliding_window=16, max_position_embeddings=1024,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **ids)
    else:
        config = MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=1026, **ids)
    torch.manual_seed(0)
    return wrap_backbone(AutoModel.from_config(config), tokenizer, name=name)


@pytest.fixture(scope="module")
def backbones():
    return {**{name: load_backbone(name) for name in TINY}, **{name: tiny_family(name) for name in FAMILIES}}


def make_sasrec(seed=0):
    torch.manual_seed(seed)
    return SASRec(NUM_ITEMS, hidden_size=16, max_len=8, dropout=0.0, attn_dropout=0.0)


def histories(seed=0, batch=4, length=8):
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, length), dtype=np.int64)
    for b in range(batch):
        n = 1 + (b * 3) % length  # ragged lengths: 1, 4, 7, 2 …
        out[b, length - n :] = rng.integers(1, NUM_ITEMS + 1, n)
    return out


def make_batch(backbone, variant, seed=0, pad_to_max_tokens=True, max_tokens=120):
    k = 0 if variant in ("llm_only", "llara") else K
    encoder = PromptEncoder(backbone.tokenizer, TEMPLATE, k, 5, max_tokens, TITLES, backbone.kind,
                            item_slots=(variant == "llara"), pad_to_max_tokens=pad_to_max_tokens)
    hist = histories(seed)
    target = np.random.default_rng(seed + 1).integers(1, NUM_ITEMS + 1, len(hist))
    return encoder({"history": hist, "target": target})


def make_model(backbone, variant="idle", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"prompt_length": K, "projection_width": 16, "refine_width": 8, **kwargs}
    return IDLEModel(backbone, make_sasrec(), variant=variant, **kwargs)


def perturb_refinement(model, scale=0.3, seed=1):
    """Move G_l off zero so every layer gets its own p^(l)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.adapter.refinement.blocks.values():
            block.up.weight.copy_(torch.randn(block.up.weight.shape, generator=gen) * scale)


def no_hooks_left(backbone):
    return all(len(layer._forward_pre_hooks) == 0 for layer in backbone.layers)


# ------------------------------------------------------------------------------------ MMD


def brute_force_mmd2(x, y):
    """Direct transcription of the estimator: explicit loops, float64."""
    x, y = x.double().numpy(), y.double().numpy()
    pooled = np.concatenate([x, y])
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(pooled, 2)]
    sigma = np.median(dists)

    def k(a, b):
        d2 = np.sum((a - b) ** 2)
        return sum(math.exp(-d2 / (2 * (sigma * s) ** 2)) for s in (0.25, 0.5, 1, 2, 4))

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_matches_hand_computed_estimator():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen)
    y = torch.randn(4, 3, generator=gen) + 0.7
    assert float(mmd2(x, y)) == pytest.approx(brute_force_mmd2(x, y), rel=1e-4, abs=1e-6)


def test_mmd_same_distribution_near_zero_and_grows_with_mean_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen)
    x2 = torch.randn(400, 16, generator=gen)
    self_mmd = float(mmd2(x, x))
    assert -0.05 < self_mmd <= 0.0  # unbiased: the diagonal is excluded on one side only
    assert abs(float(mmd2(x, x2))) < 0.03
    shifts = [float(mmd2(x, x2 + shift)) for shift in (0.25, 0.5, 1.0)]
    assert shifts[0] > 0.03
    assert shifts[0] < shifts[1] < shifts[2]


def test_mmd_gradient_flows_to_tokens_only_and_bandwidth_has_none():
    gen = torch.Generator().manual_seed(0)
    tokens = (torch.randn(8, 4, generator=gen) + 1.0).requires_grad_(True)
    text = torch.randn(64, 4, generator=gen)
    mmd2(tokens, text).backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0
    # a step along -grad lowers the MMD
    with torch.no_grad():
        stepped = tokens - 0.5 * tokens.grad
    assert float(mmd2(stepped, text)) < float(mmd2(tokens.detach(), text))


def test_mmd_layers_batched_equals_one_layer_at_a_time():
    gen = torch.Generator().manual_seed(0)
    # layers with different spreads, so each needs its own bandwidth
    tokens = (torch.randn(3, 10, 6, generator=gen) * torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1) + 0.4)
    tokens.requires_grad_(True)
    text = torch.randn(3, 40, 6, generator=gen) * torch.tensor([1.0, 2.0, 0.3]).view(3, 1, 1)
    batched = mmd2_layers(tokens, text, median_sample=None)
    (g_batched,) = torch.autograd.grad(batched.sum(), tokens)
    looped = torch.stack([mmd2(tokens[l], text[l], median_sample=None) for l in range(3)])
    (g_looped,) = torch.autograd.grad(looped.sum(), tokens)
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_batched, g_looped, atol=1e-6, rtol=1e-5)
    assert float(batched[0].detach()) == pytest.approx(brute_force_mmd2(tokens[0].detach(), text[0]), rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------ modules


def test_alignment_shape_and_refinement_starts_as_identity():
    align = DimensionAlignment(id_dim=16, hidden_size=12, prompt_length=4, projection_width=8)
    h = align(torch.randn(3, 16))
    assert h.shape == (3, 4, 12) and h.abs().sum() > 0
    refine = LayerwiseRefinement(12, [0, 2], bottleneck=5)
    out = refine(h)
    assert refine.layer_ids == (0, 2) or list(refine.layer_ids) == [0, 2]
    assert len(out) == 2
    for p in out:
        assert torch.equal(p, h)


def test_hooks_replace_capture_and_are_removed_even_on_error(backbones):
    bb = backbones["tiny-decoder"]
    ids = torch.randint(7, 70, (2, 6))
    values = torch.randn(2, bb.hidden_size)
    b_idx, t_idx = torch.tensor([0, 1]), torch.tensor([2, 4])
    seen = {}
    handle = bb.layers[1].input_layernorm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    try:
        with inject_layer_inputs(bb.layers, {1: values}, b_idx, t_idx):
            bb.model(input_ids=ids)
    finally:
        handle.remove()
    assert torch.equal(seen["x"][b_idx, t_idx], values)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layer_inputs(bb.layers, [0, 1], b_idx, t_idx) as captured:
            with inject_layer_inputs(bb.layers, {0: values}, b_idx, t_idx):
                bb.model(input_ids=ids)
                raise RuntimeError("boom")
    assert set(captured) == {0, 1} and captured[0].shape == (2, bb.hidden_size)
    assert not captured[0].equal(values)  # captured before the replacement
    assert no_hooks_left(bb)


# ------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("name", TINY + FAMILIES)
def test_zero_init_refinement_every_layer_receives_exactly_h(backbones, name):
    bb = backbones[name]
    model = make_model(bb, "idle")
    batch = make_batch(bb, "idle")
    seen = {}
    handles = [
        getattr(layer, FIRST_CHILD[name]).register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(bb.layers)
    ]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        h = model.adapter.alignment(model.id_model.user_state(torch.as_tensor(batch["history"])))  # (B, k, D)
    mask = torch.as_tensor(batch["attention_mask"])
    first_real = int(torch.nonzero(mask.any(0))[0])
    for layer in range(bb.num_layers):
        hidden = seen[layer]  # last call: the tail pass for split decoders
        for b in range(h.shape[0]):
            if bb.kind == "decoder":
                start = 0 if model.kv_split else int(batch["id_start"][b]) - first_real
            else:
                start = int(batch["id_start"][b])
            assert torch.equal(hidden[b, start : start + K], h[b]), (layer, b)


@pytest.mark.parametrize("name", TINY + FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_forward_backward(backbones, name, variant):
    bb = backbones[name]
    model = make_model(bb, variant, fusion="none").train()  # random head: gradient reaches every part at once
    out = model(make_batch(bb, variant), return_scores=True)
    assert set(out) == {"loss", "ce", "mmd", "scores"}
    assert out["scores"].shape == (4, NUM_ITEMS + 1) and torch.isinf(out["scores"][:, 0]).all()
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["scores"][:, 1:]).all()
    if variant in ("idle", "idle_no_refine"):
        assert out["mmd"].item() > 0
        assert float(out["loss"]) == pytest.approx(float(out["ce"] + model.mmd_weight * out["mmd"]), rel=1e-6)
    else:
        assert float(out["mmd"]) == 0 and torch.equal(out["loss"], out["ce"])
    out["loss"].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == is_trainable(n), n
    assert model.adapter.head.proj.weight.grad.abs().sum() > 0
    if model.adapter.alignment is not None:
        assert model.adapter.alignment.fc_out.weight.grad.abs().sum() > 0  # gradient reaches h
    if model.adapter.item_proj is not None:
        assert model.adapter.item_proj[2].weight.grad.abs().sum() > 0
    assert no_hooks_left(bb)
    assert not model.llm.training and not model.id_model.training


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encoder"])
@pytest.mark.parametrize("variant", ["idle", "llara"])
def test_only_adapter_params_change_and_detached_backbone_is_bare(backbones, name, variant):
    bb = backbones[name]
    probe = torch.randint(7, 70, (2, 9))
    with torch.no_grad():
        bare = bb.model(input_ids=probe).last_hidden_state.clone()
    model = make_model(bb, variant).train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if is_trainable(n)}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    batch = make_batch(bb, variant)
    for _ in range(3):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = [n for n in before if not is_trainable(n)]
    assert frozen and not changed.intersection(frozen)  # every LLM / ID-model tensor bit-identical
    assert changed == set(model.adapter_state_dict())  # and every adapter tensor moved
    assert no_hooks_left(bb)
    with torch.no_grad():
        assert torch.equal(bb.model(input_ids=probe).last_hidden_state, bare)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-gpt2", "tiny-gemma3"])
@pytest.mark.parametrize("variant", ["idle", "idle_no_refine"])
def test_kv_split_forward_equals_full_forward(backbones, name, variant):
    bb = backbones[name]
    split = make_model(bb, variant, kv_split=True)
    if split.adapter.refinement is not None:
        perturb_refinement(split)
    full = copy.copy(split)  # shares every module and parameter
    full.kv_split = False
    batch = make_batch(bb, variant, pad_to_max_tokens=False)
    outs = []
    for model in (split, full):
        model.zero_grad()
        torch.manual_seed(7)  # same MMD subsample
        out = model(batch, return_scores=True)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((out, grads))
    (a, grads_a), (b, grads_b) = outs
    torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["mmd"], b["mmd"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cap", [10_000, 7])
def test_mmd_text_states_are_prefix_text_tokens_capped(backbones, monkeypatch, cap):
    import idle_ray.adapter.llm_pass as llm_pass

    calls = []
    real = llm_pass.mmd2_layers
    monkeypatch.setattr(llm_pass, "mmd2_layers", lambda x, y, **kw: calls.append((x[0], y[0])) or real(x, y, **kw))
    bb = backbones["tiny-decoder"]
    model = make_model(bb, "idle_no_refine", mmd_max_text_states=cap)
    batch = make_batch(bb, "idle_no_refine", pad_to_max_tokens=False)
    model(batch)
    (tokens, text), = calls  # one refined layer: layer 0
    assert tokens.shape == (4 * K, bb.hidden_size) and tokens.requires_grad and not text.requires_grad
    ids, text_mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["text_mask"])
    prefix = int(batch["id_start"][0])
    with torch.no_grad():
        expected = bb.embed_tokens(ids[:, :prefix][text_mask[:, :prefix].bool()])  # Llama: layer-0 input
    assert text.shape[0] == min(cap, expected.shape[0])
    # every captured state is one of the real prefix text tokens' states
    assert (text.unsqueeze(1) == expected.unsqueeze(0)).all(-1).any(1).all()


def test_fixed_width_batches_are_trimmed_to_the_same_result(backbones):
    for name in ("tiny-decoder", "tiny-encoder"):
        bb = backbones[name]
        model = make_model(bb, "idle_no_mmd")
        wide = make_batch(bb, "idle_no_mmd", pad_to_max_tokens=True, max_tokens=150)
        tight = make_batch(bb, "idle_no_mmd", pad_to_max_tokens=False, max_tokens=150)
        assert wide["input_ids"].shape[1] == 150 > tight["input_ids"].shape[1]
        torch.testing.assert_close(model.full_sort_predict(wide), model.full_sort_predict(tight))


def test_llara_injects_mapped_item_embeddings_at_the_slots(backbones):
    bb = backbones["tiny-decoder"]
    model = make_model(bb, "llara")
    batch = make_batch(bb, "llara", pad_to_max_tokens=False)
    seen = {}
    handle = bb.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    try:
        model(batch)
    finally:
        handle.remove()
    pos, items = torch.as_tensor(batch["item_pos"]), torch.as_tensor(batch["item_ids"])
    b_idx, h_idx = torch.nonzero(pos >= 0, as_tuple=True)
    assert len(b_idx) == int((torch.as_tensor(batch["history"])[:, -5:] > 0).sum())
    with torch.no_grad():
        expected = model.adapter.item_proj(model.id_model.item_table()[items[b_idx, h_idx]])
    torch.testing.assert_close(seen["x"][b_idx, pos[b_idx, h_idx]], expected)


def test_adapter_checkpoint_round_trip_is_exact(backbones, tmp_path):
    bb = backbones["tiny-gpt2"]
    model = make_model(bb, "idle", seed=0).train()
    batch = make_batch(bb, "idle")
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model(batch)["loss"].backward()
    optimizer.step()
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    from safetensors.torch import load_file
    saved = load_file(path)
    assert set(saved) == set(model.adapter_state_dict()) and all(is_trainable(n) for n in saved)
    other = make_model(bb, "idle", seed=1)
    assert not all(torch.equal(v, other.adapter_state_dict()[n]) for n, v in saved.items())
    other.load_adapter(path)
    for n, v in model.adapter_state_dict().items():
        assert torch.equal(v, other.adapter_state_dict()[n]), n
    torch.testing.assert_close(other.full_sort_predict(batch), model.full_sort_predict(batch), atol=0, rtol=0)
    with pytest.raises(ValueError, match="variant"):
        make_model(bb, "idle_no_mmd").load_adapter(path)
    with pytest.raises(KeyError, match="missing"):
        other.load_adapter_state_dict({})


def test_batch_prompt_length_must_match_model(backbones):
    bb = backbones["tiny-decoder"]
    model = make_model(bb, "idle", prompt_length=K + 1)
    with pytest.raises(ValueError, match="ID tokens"):
        model(make_batch(bb, "idle"))


# ------------------------------------------------------------------------------------ prompts


def test_template_validation_errors():
    assert split_template("a {history} b {id_tokens} c") == ("a ", " b ", " c")
    for bad, match in [
        ("no fields", "history"),
        ("only {history}", "id_tokens"),
        ("{id_tokens} before {history}", "after"),
        ("{history} {history} {id_tokens}", "exactly once"),
        ("{history} {id_tokens} {user}", "unknown"),
        ("{history:>5} {id_tokens}", "format spec"),
        ("{history} {id_tokens", "valid format"),
    ]:
        with pytest.raises(ValueError, match=match):
            split_template(bad)


def test_template_must_fit_max_tokens(backbones):
    tok = backbones["tiny-decoder"].tokenizer
    with pytest.raises(ValueError, match="max_tokens"):
        PromptEncoder(tok, TEMPLATE, 8, 5, 20, TITLES, "decoder")


def visible_text(tokenizer, out, row):
    ids = out["input_ids"][row][out["text_mask"][row] == 1]
    return "".join(tokenizer.convert_ids_to_tokens(ids.tolist()))


def test_truncation_drops_oldest_titles_first(backbones):
    tok = backbones["tiny-decoder"].tokenizer  # one token per character
    titles = ["<pad>", "aaaa", "bbbb", "cccc", "dddd"]
    hist = np.array([[0, 1, 2, 3, 4]])
    fixed = len("A user watched:.") + K + len(" Next is")
    # title costs: first " aaaa" = 5 tokens, each later one "," + " bbbb" = 6
    for room, kept in [(100, "aaaa, bbbb, cccc, dddd"), (fixed + 23, "aaaa, bbbb, cccc, dddd"),
                       (fixed + 22, "bbbb, cccc, dddd"), (fixed + 16, "cccc, dddd"),
                       (fixed + 10, "dddd"), (fixed + 5, "dddd"), (fixed + 4, "")]:
        enc = PromptEncoder(tok, TEMPLATE, K, 10, room, titles, "decoder")
        out = enc(hist)
        assert out["attention_mask"].sum() <= room
        expected = f"a user watched: {kept}." if kept else "a user watched:."
        assert visible_text(tok, out, 0) == expected + " next is", room
    # max_history keeps only the most recent items
    out = PromptEncoder(tok, TEMPLATE, K, 2, 100, titles, "decoder")(hist)
    assert visible_text(tok, out, 0) == "a user watched: cccc, dddd. next is"


def test_decoder_layout_aligns_id_tokens_and_ends_with_real_token(backbones):
    tok = backbones["tiny-decoder"].tokenizer
    enc = PromptEncoder(tok, TEMPLATE, K, 5, 120, TITLES, "decoder", pad_to_max_tokens=False)
    out = enc(histories())
    ids, mask = out["input_ids"], out["attention_mask"]
    p = out["id_start"]
    assert (p == p[0]).all() and (out["prefix_len"] == p).all() and (out["num_id_tokens"] == K).all()
    assert (mask[:, -1] == 1).all() and (mask[:, p[0]:] == 1).all()
    assert (np.diff(mask, axis=1) >= 0).all()  # left padding only
    assert (ids[:, p[0]:] == ids[0, p[0]:]).all()  # same k placeholders + suffix in every row
    assert (out["text_mask"][:, p[0] : p[0] + K] == 0).all()
    for b in range(len(ids)):
        prefix_text = "".join(tok.convert_ids_to_tokens(ids[b, :p[0]][mask[b, :p[0]] == 1].tolist()))
        assert prefix_text.startswith("a user watched: ") and prefix_text.endswith(".")


def test_encoder_layout_right_pads_with_specials(backbones):
    tok = backbones["tiny-encoder"].tokenizer
    enc = PromptEncoder(tok, TEMPLATE, K, 5, 120, TITLES, "encoder", pad_to_max_tokens=False)
    out = enc(histories())
    ids, mask = out["input_ids"], out["attention_mask"]
    assert (np.diff(mask, axis=1) <= 0).all()  # right padding only
    assert (ids[:, 0] == tok.cls_token_id).all()
    lengths = mask.sum(1)
    assert all(ids[b, lengths[b] - 1] == tok.sep_token_id for b in range(len(ids)))
    assert len(set(out["id_start"].tolist())) > 1  # ragged histories, ragged ID position
    assert (out["text_mask"][:, 0] == 0).all()


def test_llara_slots_follow_their_titles(backbones):
    tok = backbones["tiny-decoder"].tokenizer
    enc = PromptEncoder(tok, TEMPLATE, 0, 5, 120, TITLES, "decoder", item_slots=True)
    hist = histories()
    out = enc(hist)
    for b in range(len(hist)):
        recent = [i for i in hist[b] if i][-5:]
        pos, items = out["item_pos"][b], out["item_ids"][b]
        assert items[items > 0].tolist() == recent and (pos >= 0).sum() == len(recent)
        for col, item in zip(pos[pos >= 0], items[items > 0]):
            assert out["input_ids"][b, col] == enc.placeholder_id and out["text_mask"][b, col] == 0
            title = "".join(tok.convert_ids_to_tokens(out["input_ids"][b, col - len(TITLES[item]) : col].tolist()))
            assert title == TITLES[item]


def test_missing_titles_fall_back_to_item_ids(backbones):
    tok = backbones["tiny-decoder"].tokenizer
    out = PromptEncoder(tok, TEMPLATE, K, 5, 120, ["", None, "", "heat"], "decoder")(np.array([[1, 2, 3]]))
    assert visible_text(tok, out, 0) == "a user watched: item 1, item 2, heat. next is"


def test_prompt_encoder_pickles_and_merges_dict_batches(backbones):
    tok = backbones["tiny-encoder"].tokenizer
    enc = PromptEncoder(tok, TEMPLATE, K, 5, 120, TITLES, "encoder")
    hist = histories()
    clone = pickle.loads(pickle.dumps(enc))
    a, b = enc(hist), clone(hist)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    merged = enc({"history": hist, "target": np.arange(4)})
    assert np.array_equal(merged["target"], np.arange(4)) and np.array_equal(merged["input_ids"], a["input_ids"])


# ------------------------------------------------------------------------------------ real backbones


@pytest.mark.slow
def test_smollm2_idle_kv_split_equals_full_forward_and_trains():
    bb = load_backbone("smollm2-135m")
    split = make_model(bb, "idle", projection_width=64, refine_width=16)
    perturb_refinement(split, scale=0.05)
    full = copy.copy(split)
    full.kv_split = False
    batch = make_batch(bb, "idle", pad_to_max_tokens=False)
    results = []
    for model in (split, full):
        model.zero_grad()
        torch.manual_seed(7)
        out = model(batch, return_scores=True)
        out["loss"].backward()
        results.append((out, model.adapter.alignment.fc_out.weight.grad.clone()))
    (a, grad_a), (b, grad_b) = results
    torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["mmd"], b["mmd"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)
    assert no_hooks_left(bb)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_minilm_variants_forward_backward(variant):
    bb = load_backbone("minilm-l6")
    model = make_model(bb, variant).train()
    out = model(make_batch(bb, variant))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.adapter.head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.model.parameters())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("variant", ["idle", "idle_no_refine", "idle_no_mmd", "llara"])
def test_fusion_step0_equals_id_model_then_trains_every_part(backbones, name, variant):
    """Score fusion: at step 0 the scores are the ID model's own (to 1e-5); after one optimiser step
    the head is off zero and the gradient reaches the alignment / item MLP too."""
    bb = backbones[name]
    model = make_model(bb, variant).train()
    batch = make_batch(bb, variant)
    with torch.no_grad():
        ours = model.full_sort_predict(batch)
        theirs = model.id_model.full_sort_predict(torch.as_tensor(batch["history"]).long())
    assert torch.isinf(ours[:, 0]).all() and torch.allclose(ours[:, 1:], theirs[:, 1:], atol=1e-5)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(is_trainable(n) for n in moved)  # frozen stays frozen
    assert model.adapter.head.proj.weight.abs().sum() > 0
    part = model.adapter.alignment.fc_out if model.adapter.alignment is not None else model.adapter.item_proj[2]
    assert part.weight.grad.abs().sum() > 0  # second step: the gradient reaches the LLM-side part
    with torch.no_grad():
        assert not torch.allclose(model.full_sort_predict(batch)[:, 1:], theirs[:, 1:], atol=1e-5)


def test_fusion_never_for_llm_only(backbones):
    model = make_model(backbones["tiny-decoder"], "llm_only")
    assert model.fusion == "none" and model.adapter.head.proj.weight.abs().sum() > 0


@pytest.mark.parametrize("variant", ["idle", "llm_only", "llara"])
@pytest.mark.parametrize("name", TINY)
def test_scoring_in_length_sorted_chunks_equals_one_pass_in_row_order(backbones, name, variant):
    """full_sort_predict scores 70 ragged rows in chunks of similar length (32, 32, 6), each trimmed to
    its longest row; the scores come back in the batch's row order and equal one pass over the whole
    batch, anchored too; the chunks really are narrower than the batch."""
    from idle_ray.adapter import model as model_module
    from idle_ray.train.builders import IDModelTask
    bb = backbones[name]
    k = 0 if variant in ("llm_only", "llara") else K
    encoder = PromptEncoder(bb.tokenizer, TEMPLATE, k, 5, 120, TITLES, bb.kind, item_slots=(variant == "llara"))
    batch = encoder({"history": histories(seed=2, batch=70)})
    model = make_model(bb, variant).eval()
    if variant == "idle":  # off zero, so scoring runs the LLM (a zero fused head skips it)
        torch.nn.init.normal_(model.adapter.head.proj.weight, std=0.05)
    widths, prepare = [], model._prepare

    def recording_prepare(b):  # the width each forward runs at, after trimming
        out = prepare(b)
        widths.append(out["input_ids"].shape[1])
        return out
    model._prepare = recording_prepare
    chunked = model.full_sort_predict(batch)
    whole = model._predict(batch)
    assert model_module.PREDICT_CHUNK == 32 and chunked.shape == whole.shape == (70, NUM_ITEMS + 1)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert len(widths) == 4 and min(widths[:3]) < widths[3] == max(widths)  # 3 chunks, then the whole batch
    if variant == "idle":
        model.set_anchor(IDModelTask(make_sasrec(seed=5)), 0.5)
        torch.testing.assert_close(model.full_sort_predict(batch), model._predict(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encoder"])
@pytest.mark.parametrize("kv_split", [True, False])
def test_scoring_skips_mmd_and_leaves_the_global_rng_alone(backbones, monkeypatch, name, kv_split):
    """Scoring (no target) computes no MMD and draws no random text sample, so a validation before
    or between training steps does not change what training does next; training still does both."""
    import idle_ray.adapter.llm_pass as llm_pass

    calls = []
    real = llm_pass.mmd2_layers
    monkeypatch.setattr(llm_pass, "mmd2_layers", lambda x, y, **kw: calls.append(1) or real(x, y, **kw))
    bb = backbones[name]
    model = make_model(bb, "idle", mmd_max_text_states=7, kv_split=kv_split).eval()  # 7 < text tokens: a draw
    batch = make_batch(bb, "idle", pad_to_max_tokens=False)
    before = torch.get_rng_state()
    model.full_sort_predict(batch)
    assert calls == [] and torch.equal(torch.get_rng_state(), before)
    out = model(batch)  # with a target: the training loss, MMD included, and its random subsample
    assert calls == [1] and out["mmd"].item() > 0 and not torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", TINY)
def test_anchor_adds_the_trained_correction_to_the_anchor_scores(backbones, name):
    """Test-time anchor: untrained, the anchored scores are the anchor's own (to 1e-5); trained, they are
    anchor + a * (adapter - its base), computed here from the parts; nothing of the anchor trains."""
    from idle_ray.train.builders import IDModelTask
    bb = backbones[name]
    model = make_model(bb, "idle").eval()
    batch = make_batch(bb, "idle")
    hist = torch.as_tensor(batch["history"]).long()
    anchor = IDModelTask(make_sasrec(seed=5))
    with torch.no_grad():
        theirs = anchor.full_sort_predict({"history": hist})
        model.set_anchor(anchor, 0.5)
        assert torch.allclose(model.full_sort_predict(batch)[:, 1:], theirs[:, 1:], atol=1e-5)
        torch.manual_seed(3)
        for p in model.adapter.head.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a trained head: the correction is not zero
        model.set_anchor(None)
        adapter = model.full_sort_predict(batch)
        base = model.id_model.full_sort_predict(hist)
        model.set_anchor(anchor, 0.5)
        anchored = model.full_sort_predict(batch)
    want = theirs[:, 1:] + 0.5 * (adapter[:, 1:] - base[:, 1:])
    assert not torch.allclose(adapter[:, 1:], base[:, 1:], atol=1e-3)
    assert torch.allclose(anchored[:, 1:], want, atol=1e-4) and torch.isinf(anchored[:, 0]).all()
    assert not any(n.startswith("anchor") for n in model.state_dict())
    assert all(not p.requires_grad for p in anchor.parameters())
    with pytest.raises(ValueError, match="an anchor needs score fusion"):
        make_model(bb, "idle", fusion="none").set_anchor(anchor, 0.5)


def test_anchor_config_rules():
    from idle_ray.config import ConfigError, config_hash, load_config
    from idle_ray.train.builders import uses_anchor
    with pytest.raises(ConfigError, match="pretrain.holdout_targets > 0 or adapter.anchor_weight: 0"):
        load_config(None, ["adapter.anchor_weight=0.5"])
    cfg = load_config(None, ["adapter.anchor_weight=0.5", "pretrain.holdout_targets=3"])
    assert uses_anchor(cfg)
    assert config_hash(cfg) == config_hash(load_config(None, ["pretrain.holdout_targets=3"]))  # same training run
    for override in ("adapter.fusion=none", "adapter.variant=llm_only", "adapter.variant=llara"):
        assert not uses_anchor(load_config(None, ["adapter.anchor_weight=0.5", "pretrain.holdout_targets=3", override]))


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encoder"])
def test_zero_fused_head_scores_without_the_llm_exactly_as_the_full_pass(backbones, monkeypatch, name):
    """Before the first update (W_o = 0, b_o = 0) fused scores are u · Eᵀ whatever the LLM reads out:
    scoring skips the frozen LLM (no layer runs) and returns exactly the full pass's scores, anchored
    too. After one optimiser step the head is off zero and scoring runs the LLM again."""
    from idle_ray.train.builders import IDModelTask
    bb = backbones[name]
    model = make_model(bb, "idle", use_item_bias=True).eval()
    batch = make_batch(bb, "idle", pad_to_max_tokens=False)
    calls = []
    handle = bb.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        skipped = model.full_sort_predict(batch)
        assert calls == []  # no LLM layer ran
        monkeypatch.setattr(model, "_correction_is_zero", lambda: False)
        full = model.full_sort_predict(batch)
        assert calls and torch.equal(skipped, full)
        model.set_anchor(IDModelTask(make_sasrec(seed=5)), 0.5)
        anchored_full = model.full_sort_predict(batch)
        monkeypatch.undo()
        calls.clear()
        assert torch.equal(model.full_sort_predict(batch), anchored_full) and calls == []
        model.set_anchor(None)
        model.train()
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
        model(batch)["loss"].backward()
        opt.step()
        model.eval()
        calls.clear()
        trained = model.full_sort_predict(batch)
        assert calls and not model._correction_is_zero() and not torch.equal(trained, full)
    finally:
        handle.remove()
