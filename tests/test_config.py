"""Config loading, overrides and validation errors (no model, no data)."""

import dataclasses
import inspect
import json
import os
import re
import typing

import pytest

from tests.conftest import FIXTURES
from train import config as config_module
from train.config import Config, ConfigError, load_config, save_config
from train.models.decoder import LlamaConfig


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


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
  path = tmp_path / "twice.yaml"
  path.write_text("train:\n  steps: 5\n  steps: 7\n")
  with pytest.raises(ConfigError, match=r"twice.yaml:3: key 'steps' is given twice.*lines 2 and 3"):
    load_config(path)
  path.write_text("optimizer:\n  lr: 1.0e-3\ntrain:\n  steps: 5\noptimizer:\n  mask_ratio: 0.3\n")
  with pytest.raises(ConfigError, match=r"twice.yaml:5: key 'optimizer'.*lines 1 and 5"):
    load_config(path)
  with pytest.raises(ConfigError, match=r"key 'a' is given twice"):
    load_config({}, ["data.task_options={a: 1, a: 2}"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
  path = tmp_path / "anchors.yaml"
  path.write_text("eval: &shared {size: 10, batch_size: 4}\ndata:\n  eval_size: 10\n")
  assert load_config(path).eval.size == 10
  path.write_text("x: &e {size: 10, batch_size: 4}\n")  # not a section: refused as such
  with pytest.raises(ConfigError, match="unknown config key 'x'"):
    load_config(path)


def test_nested_yaml_aliases_are_bounded(tmp_path):
  """A "billion laughs": 600 bytes whose aliases of aliases would expand to 10^9 values."""
  path = tmp_path / "laughs.yaml"
  lines = ["data:", "  task_options:", f"    a: &a [{', '.join(['lol'] * 9)}]"]
  for name, previous in zip("bcdefghi", "abcdefgh"):
    lines.append(f"    {name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
  path.write_text("\n".join(lines) + "\n")
  assert path.stat().st_size < 600
  with pytest.raises(ConfigError, match=r"laughs.yaml:7: YAML aliases expand this file by more"):
    load_config(path)
  path.write_text("data:\n  task_options: &a {x: [*a]}\n")
  with pytest.raises(ConfigError, match=r"laughs.yaml:2: alias \*a refers to a value that cont"):
    load_config(path)
  path.write_text("eval: &e {size: 10}\ndata:\n  task_options: {options: *e, again: *e}\n")
  assert load_config(path).data.task_options == {"options": {"size": 10}, "again": {"size": 10}}


@pytest.mark.parametrize(
  "override, message",
  [
    ("optimizer.lr=.nan", r"optimizer.lr=nan must be > 0 \(nan and inf are never allowed\)"),
    ("optimizer.lr=.inf", r"optimizer.lr=inf must be > 0 \(nan and inf"),
    ("optimizer.lr=0", r"optimizer.lr=0.0 must be > 0"),
    ("optimizer.final_lr_fraction=-5", r"optimizer.final_lr_fraction=-5.0 must be in \[0, 1\]"),
    ("optimizer.b1=-3", r"optimizer.b1=-3.0 must be in \[0, 1\)"),
    ("optimizer.b2=1.0", r"optimizer.b2=1.0 must be in \[0, 1\)"),
    ("optimizer.eps=-1", r"optimizer.eps=-1.0 must be > 0"),
    ("optimizer.eps=0", r"optimizer.eps=0.0 must be > 0"),
    ("optimizer.mask_ratio=1.5", r"optimizer.mask_ratio=1.5 must be in \[0, 1\)"),
    ("optimizer.hft_freeze_fraction=1", r"hft_freeze_fraction=1.0 must be in \(0, 1\)"),
    ("train.epochs=.inf", r"train.epochs=inf must be >= 0 \(nan and inf"),
    ("train.peak_flops_per_device=-1", r"train.peak_flops_per_device=-1.0 must be > 0"),
    ("train.profile_steps=[-1, 3]", r"train.profile_steps=-1 must be >= 0"),
    ("dpo.label_smoothing=0.5", r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
    ("dpo.beta=0", r"dpo.beta=0.0 must be > 0"),
    ("data.max_length=1", r"data.max_length=1 must be >= 2"),
    ("data.train_seed=-1", r"data.train_seed=-1 must be in \[0, 4294967296\)"),
    ("optimizer.seed=4294967296", r"optimizer.seed=4294967296 must be in \[0, 4294967296\)"),
    ("mesh.num_processes=0", r"mesh.num_processes=0 must be >= 1"),
    ("model.loss_chunk_tokens=-1", r"model.loss_chunk_tokens=-1 must be >= 0"),
  ],
)
def test_a_number_out_of_its_range_names_the_key_and_the_range(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config({}, [override])


def test_the_same_range_applies_to_values_from_a_file(tmp_path):
  path = tmp_path / "nan.yaml"
  path.write_text("optimizer:\n  lr: .nan\n")
  with pytest.raises(ConfigError, match=r"optimizer.lr=nan must be > 0"):
    load_config(path)


def _numeric(annotation) -> bool:
  """int or float, alone, optional or as a tuple's elements (bool is not a number here)."""
  args = typing.get_args(annotation)
  return annotation in (int, float) or any(_numeric(a) for a in args if a is not Ellipsis)


def test_every_numeric_field_declares_its_range():
  """A new numeric field gets its range by `ranged(default, "[low, high)")`."""
  missing = []
  for section, cls in typing.get_type_hints(Config).items():
    hints = typing.get_type_hints(cls)
    missing += [
      f"{section}.{field.name}"
      for field in dataclasses.fields(cls)
      if _numeric(hints[field.name]) and "allowed" not in field.metadata
    ]
  assert not missing


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
  (tmp_path / "list.yaml").write_text("- train\n- steps\n")
  (tmp_path / "child.yaml").write_text("base: list.yaml\ntrain:\n  steps: 3\n")
  with pytest.raises(ConfigError, match=r"list.yaml: a config file must be a mapping.*got a list"):
    load_config(tmp_path / "child.yaml")
  (tmp_path / "bad_base.yaml").write_text("base: [list.yaml]\n")
  with pytest.raises(ConfigError, match=r"bad_base.yaml: base=\['list.yaml'\] must be the path"):
    load_config(tmp_path / "bad_base.yaml")


TINY_HF = {
  "model_type": "llama",
  "vocab_size": 300,
  "hidden_size": 16,
  "intermediate_size": 32,
  "num_hidden_layers": 2,
  "num_attention_heads": 2,
}


def test_hf_config_keys_are_the_ones_the_decoder_reads():
  config = load_config({"model": {"path": None, "hf_config": {**TINY_HF, "torch_dtype": "x"}}})
  assert config.model.hf_config["vocab_size"] == 300
  typo = {**TINY_HF, "num_key_value_head": 1}
  with pytest.raises(ConfigError, match=r"unknown key model.hf_config.num_key_value_head; did yo"):
    load_config({"model": {"path": None, "hf_config": typo}})
  with pytest.raises(ConfigError, match=r"model.hf_config.hidden_size=0 must be >= 1"):
    load_config({"model": {"path": None, "hf_config": {**TINY_HF, "hidden_size": 0}}})
  lacking = {k: v for k, v in TINY_HF.items() if k != "vocab_size"}
  with pytest.raises(ConfigError, match=r"model.hf_config lacks \['vocab_size'\]"):
    load_config({"model": {"path": None, "hf_config": lacking}})


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen3", "gemma3"])
def test_each_family_config_json_is_a_valid_hf_config(name):
  """transformers' own config.json of each family, as model.hf_config (a random init)."""
  with open(os.path.join(FIXTURES, name, "config.json")) as f:
    hf = json.load(f)
  assert load_config({"model": {"path": None, "hf_config": hf}}).model.hf_config == hf
  multimodal = {"model_type": "gemma3", "text_config": {**hf, "sliding_windo": 3}}
  with pytest.raises(ConfigError, match=r"hf_config.text_config.sliding_windo; did you mean"):
    load_config({"model": {"path": None, "hf_config": multimodal}})


def test_hf_config_keys_cover_every_key_from_hf_reads():
  """The config's list of keys follows train/models/decoder.py's reader (hf["k"], hf.get("k"))."""
  source = inspect.getsource(LlamaConfig.from_hf)
  read = set(re.findall(r"""hf(?:\.get\(|\[)["'](\w+)["']""", source))
  assert read and read <= set(config_module._HF_CONFIG_KEYS), read - set(
    config_module._HF_CONFIG_KEYS
  )


LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
  "rope, message",
  [
    (
      {**LLAMA3_ROPE, "low_freq_facter": 1.0},
      r"unknown key model.hf_config.rope_scaling.low_freq_facter: rope_type 'llama3' takes "
      r"\[.*\]; did you mean 'low_freq_factor'",
    ),
    ({"factor": 2.0}, r"unknown key model.hf_config.rope_scaling.factor.*'default' takes"),
    ({"rope_type": "yarn", "factor": 4.0}, r"rope_type='yarn' is not implemented.*'llama3'\]$"),
    ({"rope_type": "llama3", "factor": 8.0}, r"rope_scaling lacks \['low_freq_factor', "),
    ({**LLAMA3_ROPE, "factor": -1}, r"rope_scaling.factor=-1 must be > 0"),
  ],
)
def test_rope_scaling_keys_are_the_ones_its_rope_type_takes(rope, message):
  with pytest.raises(ConfigError, match=message):
    load_config({"model": {"path": None, "hf_config": {**TINY_HF, "rope_scaling": rope}}})


def test_rope_scaling_as_hugging_face_writes_it_is_accepted():
  default = {"rope_type": "default", "rope_theta": 1e6}
  by_layer_type = {"full_attention": LLAMA3_ROPE, "sliding_attention": default}
  for rope in (default, {"type": "default"}, LLAMA3_ROPE, {"type": "linear", "factor": 2.0}):
    for key in ("rope_scaling", "rope_parameters"):
      hf = {**TINY_HF, key: rope}
      assert load_config({"model": {"path": None, "hf_config": hf}}).model.hf_config == hf
      if rope.get("rope_type", rope.get("type")) != "linear":  # the decoder reads it too
        LlamaConfig.from_hf(hf)
  hf = {**TINY_HF, "rope_parameters": by_layer_type}
  assert load_config({"model": {"path": None, "hf_config": hf}}).model.hf_config == hf
  with pytest.raises(ConfigError, match=r"rope_parameters.full_attention.factor=0 must be > 0"):
    hf = {**TINY_HF, "rope_parameters": {"full_attention": {**LLAMA3_ROPE, "factor": 0}}}
    load_config({"model": {"path": None, "hf_config": hf}})


def test_an_override_that_sets_a_mapping_replaces_it(tmp_path):
  default = load_config("configs/default.yaml")
  assert default.data.task_options["min_terms"] == 2
  replaced = load_config("configs/default.yaml", ["data.task=leg_counting", "data.task_options={}"])
  assert replaced.data.task_options == {}
  one = load_config("configs/default.yaml", ["data.task_options.max_digits=3"])
  assert one.data.task_options == {**default.data.task_options, "max_digits": 3}
  section = load_config("configs/default.yaml", ["optimizer={lr: 1.0e-3}"]).optimizer
  assert section.lr == 1e-3 and section.selection == "sample"  # a section merges
  layered = load_config(default, {"data": {"task_options": {"max_digits": 3}}})
  assert layered.data.task_options == {"max_digits": 3}
  assert layered.data.task == default.data.task  # sections still merge field by field
  with pytest.raises(ConfigError, match=r"override 'train.steps.x=1': steps is 40, not a mapping"):
    load_config("configs/default.yaml", ["train.steps.x=1"])


def test_a_base_file_mapping_is_replaced_by_the_child_file(tmp_path):
  (tmp_path / "base.yaml").write_text(
    "model:\n  path: null\n  hf_config: {model_type: llama, vocab_size: 300, hidden_size: 16,"
    " intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, head_dim: 8}\n"
  )
  (tmp_path / "child.yaml").write_text(
    "base: base.yaml\nmodel:\n  hf_config: {model_type: llama, vocab_size: 300, hidden_size: 32,"
    " intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4}\n"
  )
  config = load_config(tmp_path / "child.yaml")
  assert config.model.path is None  # inherited field by field
  assert "head_dim" not in config.model.hf_config  # the mapping is the child's whole
