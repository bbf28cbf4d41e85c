"""Gradient accumulation that runs the optimizer only on update steps, and
:func:`gmt`, the full Gradient-Mask Tuning optimizer."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gmt_optax import _masking, _telemetry


class AccumulationState(NamedTuple):
  """State of :func:`accumulate_gradients`.

  Attributes:
    mini_step: micro-batches accumulated since the last update.
    grad_mean: running mean of those gradients (one gradient-sized buffer).
    inner_state: state of the wrapped transformation.
  """

  mini_step: jax.Array
  grad_mean: optax.Updates
  inner_state: optax.OptState


class MaskedUpdateState(NamedTuple):
  """State of :func:`gmt` with ``mask_updates=True`` (``mask_state`` is a
  :class:`GradientMaskTelemetryState` with ``telemetry=True``)."""

  mask_state: _masking.GradientMaskState
  inner_state: optax.OptState


def accumulate_gradients(
  inner: optax.GradientTransformation,
  accumulation_steps: int,
  *,
  accumulator_dtype: Optional[jnp.dtype] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Averages gradients over micro-steps; runs ``inner`` only on the last.

  Calls ``1 .. N-1`` of every ``N`` add :math:`g_n / N` to a running mean and
  return zero updates; call ``N`` passes the mean
  :math:`\Gamma = \frac{1}{N}\sum_n g_n` to ``inner`` and returns its update.
  Unlike ``optax.MultiSteps``, which evaluates the inner transformation on
  every micro-step and discards the result, ``inner`` runs under a
  ``lax.cond`` on the update step only, so an expensive inner step (a mask
  selection) is paid once per update.

  Donate the optimizer state to the jitted step (``donate_argnums``), as
  training loops do: XLA then updates it in place through the ``lax.cond``;
  without donation it copies the inner state on every micro-step.

  Memory: one accumulator the size of the gradients, in ``accumulator_dtype``
  (default: the parameters' dtype, as ``MultiSteps``; pass ``jnp.float32``
  to accumulate bfloat16 gradients without rounding), plus ``inner``'s state.

  Args:
    inner: the transformation applied to the mean gradient.
    accumulation_steps: number of micro-steps per update, ``N >= 1``.
    accumulator_dtype: dtype of the running mean, or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an
    :class:`AccumulationState`.

  Example:
    >>> import optax, gmt_optax
    >>> tx = gmt_optax.accumulate_gradients(optax.adamw(1e-5), 4)
  """
  if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
    raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return AccumulationState(
      mini_step=_masking.replicate_like(params, jnp.zeros([], jnp.int32)),
      # zeros_like keeps each parameter's sharding.
      grad_mean=jax.tree_util.tree_map(
        lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype), params
      ),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    grad_mean = jax.tree_util.tree_map(
      lambda a, g: a + g.astype(a.dtype) / accumulation_steps, state.grad_mean, updates
    )
    is_update_step = state.mini_step == accumulation_steps - 1

    def apply_inner(inner_state):
      mean = jax.tree_util.tree_map(lambda a, g: a.astype(g.dtype), grad_mean, updates)
      return inner.update(mean, inner_state, params, **extra_args)

    def skip_inner(inner_state):
      shapes = jax.eval_shape(apply_inner, inner_state)[0]
      return (jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner_state)

    new_updates, inner_state = lax.cond(is_update_step, apply_inner, skip_inner, state.inner_state)
    # A select outside the cond: fused with the sum, no copy of the buffer.
    grad_mean = jax.tree_util.tree_map(
      lambda a: jnp.where(is_update_step, jnp.zeros_like(a), a), grad_mean
    )
    return new_updates, AccumulationState(
      mini_step=(state.mini_step + 1) % accumulation_steps,
      grad_mean=grad_mean,
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _mask_then_inner(inner, mask_ratio, seed, mask_options):
  """``chain(gradient_mask, inner)`` that also zeroes ``inner``'s update
  wherever the gradient was masked."""
  mask_options = dict(mask_options)
  telemetry = mask_options.pop("telemetry", False)
  keep_masks = _masking.keep_mask_fn(
    mask_ratio, telemetry_size=_telemetry.telemetry_sample_size(telemetry), **mask_options
  )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return MaskedUpdateState(
      mask_state=_masking.init_mask_state(
        seed, params, telemetry, mask_options.get("mask"), mask_options.get("stacked_axes")
      ),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    mask_state = state.mask_state
    keep, kept, statistics = keep_masks(updates, mask_state.count, mask_state.rng_key)
    new_updates, inner_state = inner.update(
      _masking.apply_keep_masks(updates, keep), state.inner_state, params, **extra_args
    )
    mask_state = _telemetry.next_mask_state(mask_state, kept, statistics)
    return (
      _masking.apply_keep_masks(new_updates, keep),
      MaskedUpdateState(mask_state, inner_state),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gmt(
  inner: optax.GradientTransformation,
  mask_ratio: _masking.MaskRatio,
  *,
  accumulation_steps: int = 1,
  mask_updates: bool = False,
  accumulator_dtype: Optional[jnp.dtype] = None,
  seed: int = 0,
  **gradient_mask_options,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-Mask Tuning: accumulate, mask the mean gradient, then ``inner``.

  .. math::
    \Gamma = \frac{1}{N}\sum_{n=1}^{N} \nabla_\theta L(\Theta, B_n), \qquad
    \theta \leftarrow \theta - \eta\,\mathrm{inner}(M(\Gamma, r))

  with :math:`M` the magnitude mask of :func:`gradient_mask`. With
  ``accumulation_steps=1`` and ``mask_updates=False`` this is exactly
  ``optax.chain(gradient_mask(mask_ratio, ...), inner)``. With ``N > 1`` it
  wraps that chain in :func:`accumulate_gradients`, so the mask selection and
  ``inner`` run once per update, not once per micro-batch.

  ``mask_updates=True`` also zeroes ``inner``'s output where the gradient was
  masked, so masked entries do not move at all this step (no momentum drift,
  no weight decay). Use it for a strict sparse-update ablation or when the
  masked weights must stay bit-identical (e.g. shared/frozen copies); the
  paper's chain (the default) lets them move through AdamW's momentum.

  Args:
    inner: the optimizer, e.g. ``optax.adamw(lr)``.
    mask_ratio: fraction of entries zeroed (see :func:`gradient_mask`).
    accumulation_steps: micro-batches averaged per update.
    mask_updates: also zero the final update of masked entries.
    accumulator_dtype: dtype of the gradient accumulator
      (see :func:`accumulate_gradients`).
    seed: seed of the mask sampler.
    **gradient_mask_options: ``granularity``, ``selection``, ``sample_size``,
      ``mask``, ``axis_name``, ``stacked_axes``, ``telemetry`` of
      :func:`gradient_mask`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax, gmt_optax
    >>> tx = gmt_optax.gmt(optax.adamw(1e-5), 0.4, accumulation_steps=4)

  References:
    Li et al., `Gradient-Mask Tuning Elevates the Upper Limits of LLM
    Performance <https://arxiv.org/abs/2406.15330>`_, 2024.
  """
  if mask_updates:
    step = _mask_then_inner(inner, mask_ratio, seed, gradient_mask_options)
  else:
    step = optax.chain(
      _masking.gradient_mask(mask_ratio, seed=seed, **gradient_mask_options), inner
    )
  if accumulation_steps == 1:
    return optax.with_extra_args_support(step)
  return accumulate_gradients(step, accumulation_steps, accumulator_dtype=accumulator_dtype)
