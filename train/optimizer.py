"""The optimizer chain (clip -> method -> AdamW), its schedule and its state's shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import gmt_optax
from train.config import OptimizerConfig
from train.mesh import replicated


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  if cfg.schedule == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
      [warmup],
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=cfg.lr * cfg.final_lr_fraction,
  )


def _not_embeddings(params: dict) -> dict:
  """Leaf mask: True except the token embeddings and the LM head."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not any(getattr(k, "key", None) in ("embed_tokens", "lm_head") for k in path),
    params,
  )


def _layer_axis(params: dict) -> dict:
  """Stacked axes: the scanned decoder layers' parameters lead with a layer axis, so GMT
  thresholds and HFT draws stay per layer matrix, as with one leaf per layer."""
  if not isinstance(params, dict):  # optax.tree_map_params inits with a placeholder
    return 0
  return {key: int(key == "layers") for key in params}


def _scale_by_clip_factor() -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by the `clip_factor` extra argument (none: unchanged)."""

  def update_fn(updates, state, params=None, *, clip_factor=None, **extra_args):
    del params, extra_args
    if clip_factor is not None:
      updates = jax.tree.map(lambda u: u * clip_factor.astype(u.dtype), updates)
    return updates, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _clipped(
  method: optax.GradientTransformation, clip_norm: float
) -> optax.GradientTransformationExtraArgs:
  """Clips by global norm: `method` gets the raw gradient and a `clip_factor` to apply
  before AdamW (see `build_optimizer`)."""
  method = optax.with_extra_args_support(method)

  def update_fn(updates, state, params=None, **extra_args):
    norm = optax.tree.norm(updates)
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return method.update(updates, state, params, clip_factor=factor, **extra_args)

  return optax.GradientTransformationExtraArgs(method.init, update_fn)


def build_optimizer(
  cfg: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip by global norm -> method (mask / freeze) -> AdamW with warmup + cosine.

  Every method clips the same full gradient, and the mask acts on the
  accumulated, clipped gradient before AdamW, as in the paper. The clip is a
  uniform scale, which leaves the mask's choice unchanged, so the method sees
  the raw gradient and the scale is applied just before AdamW: GMT then reads
  the gradient it samples in place, and mask, scale and AdamW fuse into one
  pass (clipping first made XLA write the clipped gradient out once more).
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.chain(
    _scale_by_clip_factor(),
    optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
  )
  leaf_mask = None if cfg.mask_embeddings else _not_embeddings
  if cfg.method == "sft":
    method = adamw
  elif cfg.method == "gmt":
    method = gmt_optax.gmt(
      adamw,
      cfg.mask_ratio,
      mask_updates=cfg.mask_updates,
      granularity=cfg.granularity,
      selection=cfg.selection,
      sample_size=cfg.sample_size,
      mask=leaf_mask,
      stacked_axes=_layer_axis,
      seed=cfg.seed,
      telemetry=cfg.telemetry != "false",
    )
  elif cfg.method == "random_mask":
    method = optax.chain(
      gmt_optax.random_mask(cfg.mask_ratio, seed=cfg.seed, mask=leaf_mask), adamw
    )
  else:
    method = gmt_optax.hft(
      adamw,
      freeze_fraction=cfg.hft_freeze_fraction,
      period=cfg.hft_period,
      stacked_axes=_layer_axis,
      seed=cfg.seed,
    )
  if cfg.clip_norm > 0:
    method = _clipped(method, cfg.clip_norm)
  return method, schedule


def opt_state_shardings(tx, params_abstract: dict, params_shardings: dict, mesh) -> Any:
  """Moments shard like their parameters; counters and keys are replicated."""
  state = jax.eval_shape(tx.init, params_abstract)
  return optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    state,
    params_shardings,
    transform_non_params=lambda _: replicated(mesh),
  )
