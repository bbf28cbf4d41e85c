"""Mask telemetry: what each update's mask did, per masked tensor and per stacked layer.

:class:`MaskTelemetry` (kept fraction, threshold, kept energy, overlap with the previous
update's mask and coverage on a fixed sample), the :class:`GradientMaskTelemetryState` that
carries it, one update's statistics (:func:`row_statistics`) and their history
(:func:`next_mask_state`), and :func:`mask_telemetry`, which finds it in an optimizer state.
``gmt_optax._masking`` computes the masks and calls these; nothing here imports it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gmt_optax import _selection

TELEMETRY_SAMPLE_SIZE = 1024  # fixed sampled entries per row for mask stability and coverage


class MaskTelemetry(NamedTuple):
  r"""What the last update's mask did, one entry per *row*: per masked tensor,
  and per layer of a stacked leaf (``stacked_axes``).

  With :math:`g` a row's gradient, :math:`m` its keep mask, :math:`K_t` the
  kept entries of the fixed sample :math:`S` (``TELEMETRY_SAMPLE_SIZE``
  entries of the row drawn uniformly with replacement from the mask's seed,
  the same at every update) at update :math:`t`:

  .. math::
    \text{kept\_energy} = \frac{\lVert g \odot m \rVert^2}{\lVert g \rVert^2},
    \qquad
    \text{jaccard} = \frac{|K_t \cap K_{t-1}|}{|K_t \cup K_{t-1}|},
    \qquad
    \text{coverage} = \frac{|K_1 \cup \dots \cup K_t|}{|S|}.

  Attributes:
    kept_fraction: ``float32[rows]``, fraction of the row's entries kept
      (counted exactly, also for sampled tensors).
    threshold: ``float32[rows]``, the magnitude :math:`T` (0 when nothing is
      masked).
    kept_energy: ``float32[rows]``, the fraction of squared gradient norm
      kept (exact; 1 for a zero gradient).
    jaccard: ``float32[rows]``, overlap of the sample's kept set with the
      previous update's (1 when both are empty; NaN at the first update).
    coverage: ``float32[rows]``, fraction of the sample kept at least once.
    leaf: ``int32[rows]``, index of the row's tensor in
      ``jax.tree_util.tree_leaves(params)``.
    layer: ``int32[rows]``, index of the row among its leaf's stacked slices
      (row-major over the stacked axes), -1 for a leaf without stacked axes.
  """

  kept_fraction: jax.Array
  threshold: jax.Array
  kept_energy: jax.Array
  jaccard: jax.Array
  coverage: jax.Array
  leaf: jax.Array
  layer: jax.Array

  def by_tensor(self, tree) -> dict:
    """The statistics on the host, named by the leaves of ``tree`` (the
    parameters, or any pytree of the same structure: shardings, abstract
    arrays).

    Returns:
      ``{"path/of/leaf": {"kept_fraction": v, "threshold": v, ...}}`` where
      ``v`` is a float, or a list of floats (one per layer) for a stacked
      leaf.
    """
    paths = [
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    values = jax.device_get(self)
    tensors: dict = {}
    for row, (leaf, layer) in enumerate(zip(values.leaf.tolist(), values.layer.tolist())):
      entry = tensors.setdefault(paths[leaf], {name: [] for name in TELEMETRY_STATISTICS})
      for name in TELEMETRY_STATISTICS:
        value = float(getattr(values, name)[row])
        entry[name] = value if layer < 0 else entry[name] + [value]
    return tensors


TELEMETRY_STATISTICS = ("kept_fraction", "threshold", "kept_energy", "jaccard", "coverage")


class GradientMaskTelemetryState(NamedTuple):
  """State of :func:`gradient_mask` with ``telemetry=True``: the fields of
  :class:`GradientMaskState`, the last update's :class:`MaskTelemetry` and one
  bit per sampled entry (``[rows, TELEMETRY_SAMPLE_SIZE]``), nothing
  parameter-sized.

  Attributes:
    count: as in :class:`GradientMaskState`.
    rng_key: as in :class:`GradientMaskState`.
    kept_fraction: as in :class:`GradientMaskState`.
    telemetry: the last update's :class:`MaskTelemetry`.
    sample_kept: ``bool[rows, samples]``, the sample's entries kept by the
      last update.
    sample_ever_kept: ``bool[rows, samples]``, those kept by any update so
      far.
  """

  count: jax.Array
  rng_key: jax.Array
  kept_fraction: jax.Array
  telemetry: MaskTelemetry
  sample_kept: jax.Array
  sample_ever_kept: jax.Array


class RowStatistics(NamedTuple):
  """One update's per-row telemetry before the state's history is applied."""

  kept_fraction: jax.Array  # [rows]
  threshold: jax.Array  # [rows]
  kept_energy: jax.Array  # [rows]
  sample_kept: jax.Array  # [rows, samples] bool


def row_statistics(rows, row_keep, row_keys, selector, rng) -> RowStatistics:
  """Telemetry of the masks ``row_keep[i]`` (``[rows, ...]`` like
  ``rows.tensors[i]``) chosen by the threshold keys ``row_keys[i]`` (``[rows]``),
  on ``selector.telemetry_size`` fixed sampled entries per row. ``rows`` and
  ``selector`` are ``gmt_optax._masking``'s ``_Rows`` and ``Selector`` (not
  annotated: this module does not import that one).

  Sums are local reductions then one all-reduce of a ``[2, rows]`` vector
  per statistic; the fixed sample is gathered as the selection's is
  (:func:`_selection.sample_entries`, one index vector per dimension) from
  the gradient, and compared with the threshold, which is exactly the mask
  there. Inside ``shard_map`` each shard draws its share of the sample from
  its local block, and a sample-sized all-reduce assembles it.
  """
  tensors, axis_name, sample_size = rows.tensors, selector.axis_name, selector.telemetry_size
  # Global keys are float32 bit patterns, per-tensor ones the tensor's own.
  per_tensor = selector.granularity == "tensor"
  float_dtypes = [t.dtype if per_tensor else jnp.float32 for t in tensors]
  energy, counts, thresholds, sizes = [], [], [], []
  shards = rows.shards
  for t, keep, keys, dtype in zip(tensors, row_keep, row_keys, float_dtypes):
    squares = jnp.square(t.astype(jnp.float32))
    axes = tuple(range(1, t.ndim))
    energy.append(jnp.stack([jnp.sum(squares, axes), jnp.sum(jnp.where(keep, squares, 0.0), axes)]))
    counts.append(_selection.count_rows(keep))
    thresholds.append(lax.bitcast_convert_type(keys, dtype).astype(jnp.float32))
    sizes.append(np.full(t.shape[0], math.prod(t.shape[1:]) * shards, np.float32))
  energy = jnp.concatenate(energy, axis=1)
  counts = _selection.psum_limbs(jnp.concatenate(counts, axis=1), axis_name)
  if axis_name is not None:
    energy = lax.psum(energy, axis_name)
  if sample_size % shards:
    raise ValueError(
      f"Mask telemetry samples {sample_size} entries per row, which {shards} "
      f"shards of axis {axis_name!r} cannot share equally."
    )
  local_size = sample_size // shards
  if axis_name is not None:
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
  drawn = _selection.sample_entries(tensors, local_size, rng)
  sample_kept = jnp.concatenate(
    [rows.key_fn(sample) >= keys[:, None] for sample, keys in zip(drawn, row_keys)]
  )
  if axis_name is not None:  # each shard fills its slot, the sum assembles all
    slots = jnp.zeros((shards,) + sample_kept.shape, jnp.int32)
    slots = slots.at[lax.axis_index(axis_name)].set(sample_kept)
    sample_kept = jnp.moveaxis(lax.psum(slots, axis_name), 0, 1).reshape(-1, sample_size) > 0
  return RowStatistics(
    kept_fraction=_selection.limbs_to_float(counts) / np.concatenate(sizes),
    threshold=jnp.concatenate(thresholds),
    kept_energy=jnp.where(energy[0] > 0, energy[1] / energy[0], 1.0),
    sample_kept=sample_kept,
  )


def all_kept_statistics(chosen, stacked_axes, sample_size) -> RowStatistics:
  """The telemetry of an update that masks nothing."""
  rows = sum(math.prod(x.shape[:a]) for x, a in zip(chosen, stacked_axes))
  return RowStatistics(
    kept_fraction=jnp.ones(rows, jnp.float32),
    threshold=jnp.zeros(rows, jnp.float32),
    kept_energy=jnp.ones(rows, jnp.float32),
    sample_kept=jnp.ones((rows, sample_size), jnp.bool_),
  )


def next_mask_state(state, kept, statistics: Optional[RowStatistics]):
  """The mask state after an update: one more count, its kept fraction and,
  with telemetry, the statistics with the mask's history (overlap with the
  previous update's sample, entries ever kept)."""
  new_state = state._replace(count=optax.safe_increment(state.count), kept_fraction=kept)
  if statistics is None:
    return new_state
  if statistics.sample_kept.shape != state.sample_kept.shape:
    raise ValueError(
      f"gradient_mask(telemetry=True): the updates have {statistics.sample_kept.shape[0]} "
      f"masked rows, the state {state.sample_kept.shape[0]}: init the state with "
      "parameters of the same structure and shapes as the updates."
    )
  previous, current = state.sample_kept, statistics.sample_kept
  both = jnp.sum(previous & current, axis=1, dtype=jnp.int32)
  either = jnp.sum(previous | current, axis=1, dtype=jnp.int32)
  jaccard = jnp.where(either > 0, both / jnp.maximum(either, 1), 1.0).astype(jnp.float32)
  ever_kept = state.sample_ever_kept | current
  telemetry = state.telemetry._replace(
    kept_fraction=statistics.kept_fraction,
    threshold=statistics.threshold,
    kept_energy=statistics.kept_energy,
    jaccard=jnp.where(state.count == 0, jnp.nan, jaccard),
    coverage=jnp.mean(ever_kept, axis=1, dtype=jnp.float32),
  )
  return new_state._replace(telemetry=telemetry, sample_kept=current, sample_ever_kept=ever_kept)


def first_state(opt_state, state_types):
  """The first node of one of ``state_types`` in a nested optimizer state."""
  is_state = lambda x: isinstance(x, state_types)
  return next(
    (n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state) if is_state(n)), None
  )


def mask_telemetry(opt_state) -> Optional[MaskTelemetry]:
  r"""The last update's :class:`MaskTelemetry` found anywhere in an optimizer
  state (as :func:`kept_fraction` finds the kept fraction); ``None`` when no
  :func:`gradient_mask` in it has ``telemetry=True``.

  Per row :math:`l` (a masked tensor, or one layer of a stacked leaf) with
  gradient :math:`g_l`, keep mask :math:`m_l` and threshold :math:`T_l`, the
  telemetry holds the kept fraction :math:`\operatorname{mean}(m_l)`,
  :math:`T_l`, the kept energy
  :math:`\lVert g_l \odot m_l \rVert^2 / \lVert g_l \rVert^2`, and on a
  fixed sample :math:`S_l` of entries the Jaccard overlap
  :math:`|K_t \cap K_{t-1}| / |K_t \cup K_{t-1}|` of the kept sets
  :math:`K_t = \{i \in S_l : m_{l,i} = 1\}` of this update and the previous
  one, and the coverage :math:`|K_1 \cup \dots \cup K_t| / |S_l|`.
  Usable inside ``jit`` (to return it as a metric); name the rows on the host
  with :meth:`MaskTelemetry.by_tensor`.

  Example:
    >>> import jax.numpy as jnp, optax, gmt_optax
    >>> tx = optax.chain(
    ...     gmt_optax.gradient_mask(0.5, telemetry=True), optax.sgd(1.0))
    >>> params = {"w": jnp.array([1.0, -4.0, 2.0, -3.0])}
    >>> _, state = tx.update(params, tx.init(params))
    >>> telemetry = gmt_optax.mask_telemetry(state)
    >>> telemetry.kept_energy  # (16 + 9) / (1 + 16 + 4 + 9)
    Array([0.8333333], dtype=float32)
    >>> telemetry.by_tensor(params)["w"]["threshold"]
    3.0
  """
  state = first_state(opt_state, GradientMaskTelemetryState)
  return None if state is None else state.telemetry


def telemetry_sample_size(telemetry) -> int:
  """Entries sampled per row for :func:`gradient_mask`'s ``telemetry`` flag
  (0: off), checked to be a Python bool."""
  if not isinstance(telemetry, bool):
    raise ValueError(f"telemetry must be a Python bool, got {telemetry!r}.")
  return TELEMETRY_SAMPLE_SIZE if telemetry else 0
