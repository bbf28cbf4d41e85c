"""Half Fine-Tuning (HFT), a comparison method: freeze a random half of the
parameter matrices, re-drawn periodically."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gmt_optax import _masking


class HFTState(NamedTuple):
  """State of :func:`hft`.

  Attributes:
    count: updates done; the frozen set is re-drawn every ``period``.
    rng_key: base key of the draws.
    frozen: ``[num_selected]`` bools, the frozen matrices (leaves, or slices
      of stacked leaves) of the last update.
    inner_state: state of the wrapped optimizer.
  """

  count: jax.Array
  rng_key: jax.Array
  frozen: jax.Array
  inner_state: optax.OptState


def hft(
  inner: optax.GradientTransformation,
  *,
  freeze_fraction: float = 0.5,
  period: int = 100,
  seed: int = 0,
  mask: Optional[_masking.LeafMask] = None,
  stacked_axes: _masking.StackedAxes = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Freezes a random ``freeze_fraction`` of the parameter matrices.

  Every ``period`` updates, ``round(freeze_fraction * L)`` of the ``L``
  selected matrices are drawn at random (uniformly, without replacement). A
  matrix is a selected leaf, or one slice ``x[l]`` of a leaf with stacked
  axes (scanned layers), so a layer freezes whole whatever the layout. A
  frozen matrix gets a zero gradient into ``inner`` and a zero final update,
  so it does not move at all (no momentum drift, no weight decay); the others
  are updated by ``inner`` as usual. Leaves not selected always train.

  This follows Hui et al. (2024) at the granularity of whole matrices, drawn
  over the whole model rather than per block.

  Args:
    inner: the optimizer, e.g. ``optax.adamw(lr)``.
    freeze_fraction: fraction of selected leaves frozen, in ``[0, 1]``.
    period: updates between re-draws of the frozen set.
    seed: seed of the draws.
    mask: leaves taking part in the draw (pytree prefix of bools or callable,
      as ``optax.masked``); default: every leaf whose slices are matrices
      (``ndim - stacked_axes >= 2``).
    stacked_axes: leading axes of a leaf that index independent matrices, as
      in :func:`gmt_optax.gradient_mask` (an int, a pytree prefix of ints or
      a callable returning one); ``None`` (default) means 0.

  Example:
    Scanned layers: 4 layers stacked in each leaf, so 4 of the 8 layer
    matrices freeze; the stacked norms (vectors per layer) always train:

    >>> import jax.numpy as jnp, optax, gmt_optax
    >>> params = {"q": jnp.ones((4, 8, 8)), "mlp": jnp.ones((4, 8, 16)),
    ...           "norm": jnp.ones((4, 8))}
    >>> tx = gmt_optax.hft(optax.sgd(1.0), stacked_axes=1)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> int(state.frozen.sum()), state.frozen.shape
    (4, (8,))

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an :class:`HFTState`.

  References:
    Hui et al., `HFT: Half Fine-Tuning for Large Language Models
    <https://arxiv.org/abs/2404.18466>`_, 2024.
  """
  if not 0.0 <= freeze_fraction <= 1.0:
    raise ValueError(f"freeze_fraction must be in [0, 1], got {freeze_fraction!r}.")
  if not isinstance(period, int) or period < 1:
    raise ValueError(f"period must be an int >= 1, got {period!r}.")
  _masking.check_stacked_axes(stacked_axes)
  inner = optax.with_extra_args_support(inner)

  def draw(rng_key, count, num_selected):
    rng = jax.random.fold_in(rng_key, count // period)
    num_frozen = round(freeze_fraction * num_selected)
    return jax.random.permutation(rng, num_selected) < num_frozen

  def matrices(tree):
    """Leaves, treedef and, per leaf, its stacked shape (``None`` when it is
    not in the draw)."""
    leaves, treedef, selected = _masking.selected_leaves(tree, mask)
    stacked = _masking.leaf_stacked_axes(tree, leaves, treedef, selected, stacked_axes)
    if mask is None:
      selected = [s and x.ndim - a >= 2 for x, a, s in zip(leaves, stacked, selected)]
    return (
      leaves,
      treedef,
      [x.shape[:a] if s else None for x, a, s in zip(leaves, stacked, selected)],
    )

  def freeze(tree, frozen):
    leaves, treedef, stacked_shapes = matrices(tree)
    out, start = [], 0
    for x, shape in zip(leaves, stacked_shapes):
      if shape is not None:
        size = math.prod(shape)
        frozen_here = frozen[start : start + size].reshape(shape + (1,) * (x.ndim - len(shape)))
        x = jnp.where(frozen_here, jnp.zeros_like(x), x)
        start += size
      out.append(x)
    return treedef.unflatten(out)

  def init_fn(params):
    num_selected = sum(math.prod(shape) for shape in matrices(params)[2] if shape is not None)
    rng_key = jax.random.PRNGKey(seed)
    count, rng_key, frozen = _masking.replicate_like(
      params, (jnp.zeros([], jnp.int32), rng_key, draw(rng_key, 0, num_selected))
    )
    return HFTState(count=count, rng_key=rng_key, frozen=frozen, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    frozen = draw(state.rng_key, state.count, state.frozen.shape[0])
    new_updates, inner_state = inner.update(
      freeze(updates, frozen), state.inner_state, params, **extra_args
    )
    return freeze(new_updates, frozen), HFTState(
      count=optax.safe_increment(state.count),
      rng_key=state.rng_key,
      frozen=frozen,
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
