"""pretrain.init_artifact: pre-training that starts from an exported ID model's weights (the refit of
the adapter's held-out base), and its refusal of an artifact of another model."""
import dataclasses

import pytest
import torch

from idle_ray.config import load_config
from idle_ray.models.artifact import ArtifactError, save_id_artifact
from idle_ray.train.builders import build_pretrain_task


def test_init_artifact_starts_from_its_weights_and_trains(tiny_prepared, tmp_path):
    cfg = load_config(None, ["id_model.hidden_size=16", "id_model.num_heads=2", "seed=3"])
    start, kwargs = build_pretrain_task(cfg, tiny_prepared)
    save_id_artifact(start.model, tmp_path / "art", name="sasrec", kwargs=kwargs,
                     vocab_fingerprint=tiny_prepared.manifest["vocab_fingerprint"])
    other_seed = dataclasses.replace(cfg, seed=4)
    fresh, _ = build_pretrain_task(other_seed, tiny_prepared)
    assert not torch.equal(fresh.model.item_embedding.weight, start.model.item_embedding.weight)
    refit_cfg = dataclasses.replace(other_seed, pretrain=dataclasses.replace(cfg.pretrain, init_artifact=str(tmp_path / "art")))
    refit, _ = build_pretrain_task(refit_cfg, tiny_prepared)
    for (name, a), (_, b) in zip(refit.model.state_dict().items(), start.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in refit.parameters())  # trainable, not frozen like a loaded artifact
    opt = torch.optim.Adam(refit.parameters(), lr=1e-2)
    history = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])
    loss = torch.nn.functional.cross_entropy(refit.model.full_sort_predict(history), torch.tensor([4, 6]))
    loss.backward()
    opt.step()
    assert not torch.equal(refit.model.item_embedding.weight, start.model.item_embedding.weight)

    wider = dataclasses.replace(refit_cfg, id_model=dataclasses.replace(cfg.id_model, hidden_size=32))
    with pytest.raises(ArtifactError, match="pretrain.init_artifact"):
        build_pretrain_task(wider, tiny_prepared)


def test_a_caser_artifact_saved_without_its_window_kwargs_is_the_same_model(tiny_prepared, tmp_path):
    """Caser artifacts exported before the window and filter counts were passed explicitly (kwargs without
    max_len, num_vertical, num_horizontal) are accepted as the default Caser, and refused for another window."""
    cfg = load_config(None, ["id_model.name=caser", "id_model.hidden_size=16", "data.max_history=6"])
    start, kwargs = build_pretrain_task(cfg, tiny_prepared)
    old_kwargs = {k: v for k, v in kwargs.items() if k not in ("max_len", "num_vertical", "num_horizontal")}
    save_id_artifact(start.model, tmp_path / "art", name="caser", kwargs=old_kwargs,
                     vocab_fingerprint=tiny_prepared.manifest["vocab_fingerprint"])
    refit_cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, init_artifact=str(tmp_path / "art")))
    refit, _ = build_pretrain_task(refit_cfg, tiny_prepared)
    assert torch.equal(refit.model.conv_v.weight, start.model.conv_v.weight)
    longer = dataclasses.replace(refit_cfg, id_model=dataclasses.replace(cfg.id_model, caser_window=6))
    with pytest.raises(ArtifactError, match="pretrain.init_artifact"):
        build_pretrain_task(longer, tiny_prepared)
