from pathlib import Path

import pytest

from idle_ray.config import ConfigError, ExperimentConfig, config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_load():
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.dataset == "ml-100k" and cfg.prompt.max_history == 10


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_documents_its_command(path):
    load_config(path)
    head = path.read_text().splitlines()[:6]
    assert any("python jobs/" in line for line in head if line.startswith("#")), "launch command comment missing"


def test_unknown_key_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.max_histroy"):
        load_config(write(tmp_path, "data:\n  max_histroy: 3\n"))


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.batch_size' must be an integer"):
        load_config(write(tmp_path, "train:\n  batch_size: sixteen\n"))
    with pytest.raises(ConfigError, match=r"'adapter\.mmd_weight' must be a number"):
        load_config(write(tmp_path, "adapter:\n  mmd_weight: true\n"))


def test_out_of_range_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"adapter\.prompt_length.*above its maximum 32"):
        load_config(write(tmp_path, "adapter:\n  prompt_length: 33\n"))
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(write(tmp_path, "train:\n  zero_stage: 4\n"))
    with pytest.raises(ConfigError, match=r"id_model\.name.*not one of"):
        load_config(write(tmp_path, "id_model:\n  name: bert4rec\n"))


def test_template_must_put_id_tokens_after_history(tmp_path):
    with pytest.raises(ConfigError, match="prompt.template"):
        load_config(None, ["prompt.template={id_tokens} then {history}"])


def test_dotted_overrides_apply_and_are_checked():
    cfg = load_config(None, ["data.max_history=20", "adapter.mmd_weight=0.5", "eval.protocols=[full, llara]"])
    assert cfg.data.max_history == 20 and cfg.adapter.mmd_weight == 0.5 and cfg.eval.protocols == ["full", "llara"]
    with pytest.raises(ConfigError, match=r"data\.max_history"):
        load_config(None, ["data.max_history=-1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["data.max_history"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [\n"))


def test_config_hash_changes_with_content():
    assert config_hash(load_config(None)) == config_hash(load_config(None))
    assert config_hash(load_config(None)) != config_hash(load_config(None, ["seed=1"]))
    # where things are kept is no part of what is trained: run names and cached results stay
    for where in ("id_model.artifacts_dir=s3://b/artifacts", "data.build_dir=/mnt/shared/build"):
        assert config_hash(load_config(None, [where])) == config_hash(load_config(None))
    # the main job's hash, which its pooled three-seed results (README) carry
    assert config_hash(load_config(ROOT / "configs" / "main_ml100k.yaml")) == "29cdf1a76055"


def test_kv_split_setting():
    import torch

    from idle_ray.train.builders import kv_split

    assert kv_split(load_config(None, ["adapter.kv_split=always", "train.use_gpu=true"]))
    assert not kv_split(load_config(None, ["adapter.kv_split=never"]))
    assert kv_split(load_config(None, ["adapter.kv_split=auto"]))  # CPU training
    assert kv_split(load_config(None, ["train.use_gpu=true"])) == (not torch.cuda.is_available())
    with pytest.raises(ConfigError, match=r"adapter\.kv_split"):
        load_config(None, ["adapter.kv_split=maybe"])


def test_holdout_window_needs_room_for_its_targets():
    from idle_ray.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="pretrain.holdout_window' = 2 is below pretrain.holdout_targets = 3"):
        load_config(None, ["pretrain.holdout_targets=3", "pretrain.holdout_window=2"])
    assert load_config(None, ["pretrain.holdout_targets=3", "pretrain.holdout_window=10"]).pretrain.holdout_window == 10
