"""A run's set-up, done once: config -> mesh -> model -> data -> batches -> jitted steps.

`setup_run(config)` returns a `Run`: what the training loop (`train.loop`), the evaluator
(`train.eval.evaluator`), the export and the summary share. `train.plan` builds the same steps
for abstract parameters (`abstract_split_model`), and `benchmarks/train_step.py` times
those of a `Run`. A `cache` dict lets runs in one process (`train.study`, the benchmark)
reuse what their configs agree on: the loaded model, the prepared data, the compiled steps.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from train.config import Config
from train.data import Batches, examples_for_generation, prepare
from train.eval import harness
from train.mesh import check_micro_batch, make_mesh, param_shardings
from train.models.decoder import Llama, LlamaConfig, abstract_model, resolve_attention
from train.models.gguf_import import resolve_model_path
from train.models.pretrained import load_pretrained
from train.models.tokenizer import AlpacaTemplate, ByteTokenizer
from train.records import log
from train.step import SplitModel, Steps, build_steps


def shared(cache: dict | None, key: tuple, make):
  """`make()`, or its earlier result under `key` in `cache` (no cache: always made afresh)."""
  if cache is None:
    return make()
  key = repr(key)  # configs hold dicts (task options, HF configs): compare them by value
  if key not in cache:
    cache[key] = make()
  return cache[key]


def abstract_arrays(tree, shardings):
  """`tree` as `ShapeDtypeStruct`s carrying `shardings`: what ahead-of-time compiles take."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def abstract_split_model(config: Config, model_config: LlamaConfig, mesh) -> SplitModel:
  """The model `config` runs, with abstract parameters sharded over `mesh`; allocates nothing.

  Built with the configured compute dtype, remat and attention (for the mesh's platform),
  so weights loaded in `param_dtype` compute in bf16 without a second copy.
  """
  cfg = config.model
  graphdef, params, rest = abstract_model(
    model_config,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    remat=cfg.remat,
    attention=resolve_attention(cfg.attention, mesh.devices.flat[0].platform),
    logits_dot_in_fp32=cfg.logits_dot_in_fp32,
  )
  shardings = param_shardings(params, mesh)
  return SplitModel(graphdef, abstract_arrays(nnx.to_pure_dict(params), shardings), rest, shardings)


def _tokenizer(config: Config, tokenizer, model_config: LlamaConfig):
  """The tokenizer the data asks for (`data.tokenizer`, `data.template`), checked against
  the model's vocabulary."""
  if config.data.tokenizer == "bytes":
    tokenizer = ByteTokenizer()
  if tokenizer is None:
    raise ValueError(
      "model.path is null (random init), which has no tokenizer: set data.tokenizer=bytes"
    )
  if config.data.template == "alpaca":
    tokenizer = AlpacaTemplate(tokenizer)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model_config.vocab_size}"
    )
  return tokenizer


def load_model(config: Config, mesh) -> tuple[SplitModel, object]:
  """(the model of `config.model` sharded over `mesh`, its tokenizer): pretrained weights
  (`model.path`) or a random initialisation (`model.hf_config`, `model.seed`)."""
  cfg = config.model
  param_dtype = jnp.dtype(cfg.param_dtype)
  if cfg.path is not None:
    model, tokenizer = load_pretrained(resolve_model_path(cfg.path), mesh=mesh, dtype=param_dtype)
  else:
    model = Llama(
      LlamaConfig.from_hf(cfg.hf_config), rngs=nnx.Rngs(cfg.seed), param_dtype=param_dtype
    )
    tokenizer = None
  tokenizer = _tokenizer(config, tokenizer, model.config)
  abstract = abstract_split_model(config, model.config, mesh)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.device_put(params, abstract.shardings)  # a no-op for weights loaded on the mesh
  return dataclasses.replace(abstract, params=params), tokenizer


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run's loop, evaluation, export and summary share, built once by `setup_run`."""

  config: Config
  mesh: jax.sharding.Mesh
  model: SplitModel  # the parameters before training (a private copy when shared)
  model_config: LlamaConfig
  tokenizer: object
  train_rows: dict  # token rows [N, L]; DPO's precomputed reference adds "reference_logps"
  eval_rows: dict | None  # held-out rows (None: no held-out loss)
  eval_items: list[dict]  # held-out prompts with references, or a benchmark's problems
  data_report: dict  # what preparing the data kept and dropped
  batches: Batches
  total_steps: int
  steps: Steps
  cache_key: tuple  # what the model and data depend on, for results shared through a cache


def _eval_items(config: Config, tokenizer, held_out: list) -> list[dict]:
  """The held-out prompts with their references, or the configured benchmark's items."""
  if config.eval.benchmark == "held_out":
    return examples_for_generation(tokenizer, held_out)
  return harness.load_items(
    config.eval.benchmark,
    held_out if config.data.source == "reasoning_gym" else None,
    config.eval.size,
  )


def setup_run(config: Config, cache: dict | None = None) -> Run:
  """Builds the mesh, loads the model and tokenizer, prepares the data and batches and
  builds the jitted steps of a validated `config` (`train.config.load_config`)."""
  mesh = make_mesh(config.mesh)
  log(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"{jax.process_count()} process(es)"
  )
  t = config.train
  check_micro_batch(t.micro_batch_size, mesh.shape, f"{jax.device_count()} devices")
  start = time.time()
  model_key = ("model", config.model, config.data.tokenizer, config.data.template, config.mesh)
  model, tokenizer = shared(cache, model_key, lambda: load_model(config, mesh))
  if cache is not None:  # the train step donates its params: keep the shared ones intact
    model = dataclasses.replace(model, params=jax.tree.map(jnp.copy, model.params))
  log(f"model: {model.num_params / 1e6:.1f}M parameters ({time.time() - start:.1f} s)")

  dpo_cfg = config.dpo_objective
  train_rows, eval_rows, held_out, report = shared(
    cache,
    ("data", model_key, config.data, dpo_cfg),
    lambda: prepare(config.data, tokenizer, dpo_cfg is not None),
  )
  log("data: " + ", ".join(f"{k} {v}" for k, v in report.items()))
  batches = Batches(
    train_rows,
    t.batch_size,
    t.micro_batch_size,
    config.data.shuffle_seed,
    rows_per_item=config.rows_per_item,  # a pair's two rows stay together
  )
  if batches.num_items < t.batch_size:
    # A warning, not an error: the batches come from an endless stream of epochs (MaxText's
    # repeat-then-batch), so a set smaller than one batch repeats rows inside each step,
    # and TRL too trains a set smaller than a batch; but the sizes are a surprise worth naming.
    unit = "pairs" if dpo_cfg else "rows"
    examples = report["train_pairs" if dpo_cfg else "train_examples"]
    log(
      f"warning: the training set is {batches.num_items} {unit} ({examples} examples, "
      f"data.train_size={config.data.train_size}), fewer than train.batch_size={t.batch_size}: "
      f"each step repeats {unit}, each about {t.batch_size / batches.num_items:.1f} times; "
      "give more data or a smaller train.batch_size"
    )
  total_steps = t.steps or math.ceil(t.epochs * batches.num_items / t.batch_size)
  steps = shared(
    cache,
    ("steps", model_key, config.optimizer, total_steps, batches.shape, dpo_cfg),
    lambda: build_steps(model, config, mesh, total_steps),
  )
  return Run(
    config=config,
    mesh=mesh,
    model=model,
    model_config=model.merged().config,
    tokenizer=tokenizer,
    train_rows=train_rows,
    eval_rows=eval_rows,
    eval_items=_eval_items(config, tokenizer, held_out),
    data_report=report,
    batches=batches,
    total_steps=total_steps,
    steps=steps,
    cache_key=model_key,
  )
