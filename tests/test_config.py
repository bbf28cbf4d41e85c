"""Config loading, overrides and validation errors (no model, no data)."""

import pytest

from train.config import Config, ConfigError, load_config, save_config


def test_defaults_and_overrides():
  config = load_config(
    {}, ["optimizer.mask_ratio=0.3", "train.steps=50", "data.train_files=[a.jsonl]"]
  )
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
  with pytest.raises(
    ConfigError, match=r"optimizer.method='adam'.*\['gmt', 'sft', 'random_mask', 'hft'\]"
  ):
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


@pytest.mark.parametrize(
  "override, message",
  [
    ("checkpoint.keep=0", r"checkpoint.keep=0 must be >= 1"),
    ("train.log_every=0", r"train.log_every=0 must be >= 1"),
    ("train.steps=-5", r"train.steps=-5 must be >= 0"),
    ("mesh.data=0", r"mesh.data=0 must be >= 1, or -1"),
    ("mesh.tensor=-2", r"mesh.tensor=-2 must be >= 1, or -1"),
    ("eval.batch_size=0", r"eval.batch_size=0 must be >= 1"),
  ],
)
def test_values_that_would_fail_late_are_refused(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config({}, [override, "train.epochs=1"])
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    load_config({}, ["mesh.data=-1", "mesh.fsdp=-1"])
  with pytest.raises(ConfigError, match="choose one"):
    load_config({}, ["train.resume=true", "train.overwrite=true"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
  path = tmp_path / "broken.yaml"
  path.write_text("train:\n  steps: 3\n  output_dir: [a,\n")
  with pytest.raises(ConfigError, match=r"broken.yaml:4:1: invalid YAML"):
    load_config(path)
  with pytest.raises(ConfigError, match=r"override 'train.steps=\[1': invalid YAML"):
    load_config({}, ["train.steps=[1"])
