"""Config loading, overrides and validation errors (no model, no data)."""

import pytest

from train.config import Config, ConfigError, load_config, save_config


def test_defaults_and_overrides():
    config = load_config({}, ["optimizer.mask_ratio=0.3", "train.steps=50", "data.train_files=[a.jsonl]"])
    assert config.optimizer.mask_ratio == 0.3
    assert config.train.steps == 50
    assert config.data.train_files == ("a.jsonl",)
    assert isinstance(config, Config)


def test_unknown_key_names_nearest_match():
    with pytest.raises(ConfigError, match=r"optimizer\.mask_ratio"):
        load_config({}, ["optimizer.mask_ration=0.3"])
    with pytest.raises(ConfigError, match="unknown config key 'optimiser'.*'optimizer'"):
        load_config({"optimiser": {}})


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"optimizer.method='adam'.*\['gmt', 'sft', 'random_mask', 'hft'\]"):
        load_config({}, ["optimizer.method=adam"])


def test_bad_types_and_ranges():
    with pytest.raises(ConfigError, match="train.steps='many'.*integer"):
        load_config({}, ["train.steps=many"])
    with pytest.raises(ConfigError, match="mask_ratio=1.5"):
        load_config({}, ["optimizer.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config({}, ["train.batch_size=8", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_save_and_reload_round_trip(tmp_path):
    config = load_config({}, ["mesh.fsdp=2", "train.resume=true", "mesh.distributed=false"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
