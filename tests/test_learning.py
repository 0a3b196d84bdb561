"""Learning happens: on a task where the titles carry what the ID model lacks, the adapters learn it.

The task: 24 items in 4 groups; every title spells its group in characters no other group uses
("aaaa ...", "zzzz ...", ...). A user's next item is a random item of the group of the last item
seen, so a perfect model puts the target in its top 6 (HR@6 = 1); chance is 6/24. The ID model is
a SASRec with random weights: it knows nothing (it stands for an ID model without this knowledge).
A frozen, randomly initialised 2-layer decoder reads the prompt. After a short training with a
plain optimiser on training samples, on held-out validation samples:

* IDLE-Adapter with score fusion ranks far better than its ID model (which it equals at step 0);
* LLM-only ranks far better than chance.

Every assertion can fail: a head that does not learn, a broken read-out or injection, or a fusion
that hides the LLM's signal would leave these rankings at chance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from idle_ray.adapter.model import IDLEModel
from idle_ray.eval.metrics import target_ranks
from idle_ray.llm.backbone import load_backbone
from idle_ray.llm.prompts import PromptEncoder
from idle_ray.models.sasrec import SASRec

GROUPS = ("aaaa", "zzzz", "mmmm", "1111")
PER_GROUP = 6
NUM_ITEMS = len(GROUPS) * PER_GROUP
TOP = PER_GROUP
TITLES = ["<pad>"] + [f"{GROUPS[(i - 1) // PER_GROUP]} {GROUPS[(i - 1) // PER_GROUP]}" for i in
                      range(1, NUM_ITEMS + 1)]
TEMPLATE = "{history} {id_tokens} next"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def samples(n: int, seed: int, history: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(histories (n, history), targets (n,))``: random items, target in the last item's group."""
    rng = np.random.default_rng(seed)
    hist = rng.integers(1, NUM_ITEMS + 1, (n, history))
    group = (hist[:, -1] - 1) // PER_GROUP
    target = group * PER_GROUP + rng.integers(1, PER_GROUP + 1, n)
    return hist, target


def hr_at_top(model, encoder, hist, target) -> float:
    with torch.no_grad():
        scores = model.full_sort_predict(encoder({"history": hist}))
    return float((target_ranks(scores, torch.as_tensor(target)) < TOP).float().mean())


def id_model_hr(id_model, hist, target) -> float:
    with torch.no_grad():
        scores = id_model.full_sort_predict(torch.as_tensor(hist))
    return float((target_ranks(scores, torch.as_tensor(target)) < TOP).float().mean())


def train(model, encoder, steps: int = 150, batch: int = 32, lr: float = 0.01) -> None:
    torch.manual_seed(0)
    hist, target = samples(steps * batch, seed=1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    model.train()
    for s in range(steps):
        sl = slice(s * batch, (s + 1) * batch)
        out = model({**encoder({"history": hist[sl]}), "target": torch.as_tensor(target[sl])})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-decoder")


def build(backbone, variant: str):
    torch.manual_seed(0)
    id_model = SASRec(NUM_ITEMS, hidden_size=16, max_len=4, dropout=0.0, attn_dropout=0.0).eval()
    k = 2 if variant.startswith("idle") else 0
    model = IDLEModel(backbone, id_model, variant=variant, prompt_length=k, projection_width=32,
                      refine_width=8, mmd_weight=0.01)
    encoder = PromptEncoder(backbone.tokenizer, TEMPLATE, k, 1, 64, TITLES, backbone.kind)
    return model, encoder


def test_idle_with_fusion_beats_its_id_model_when_titles_carry_the_signal(backbone):
    model, encoder = build(backbone, "idle")
    hist, target = samples(400, seed=7)  # validation: held-out samples
    base = id_model_hr(model.id_model, hist, target)
    assert hr_at_top(model, encoder, hist, target) == pytest.approx(base, abs=1e-6)  # step 0 = ID model
    train(model, encoder)
    learned = hr_at_top(model, encoder, hist, target)
    assert learned > base + 0.2, (learned, base)


def test_llm_only_beats_chance(backbone):
    model, encoder = build(backbone, "llm_only")
    hist, target = samples(400, seed=7)
    chance = TOP / NUM_ITEMS
    before = hr_at_top(model, encoder, hist, target)
    train(model, encoder)
    learned = hr_at_top(model, encoder, hist, target)
    assert learned > chance + 0.25 and learned > before + 0.2, (learned, before, chance)


def test_fusion_step0_equals_id_model_on_real_smollm2(tmp_path):
    """The real backbone (SmolLM2-135M, de-quantised into an empty cache folder): at step 0 the fused
    IDLE scores are the ID model's own, to 1e-5, through all 30 layers' injections."""
    bb = load_backbone("smollm2-135m", cache_dir=str(tmp_path))
    model, encoder = build(bb, "idle")
    hist, _ = samples(8, seed=3)
    with torch.no_grad():
        ours = model.full_sort_predict(encoder({"history": hist}))
        theirs = model.id_model.full_sort_predict(torch.as_tensor(hist))
    assert torch.isinf(ours[:, 0]).all() and torch.allclose(ours[:, 1:], theirs[:, 1:], atol=1e-5)
