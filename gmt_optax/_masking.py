"""Gradient-magnitude masking (GMT) and its same-sparsity random baseline.

What a mask did (``gradient_mask(telemetry=True)``) is computed and carried by
``gmt_optax._telemetry``; this module imports that one, never the other way.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gmt_optax import _selection, _telemetry

MaskRatio = Union[float, jax.Array, optax.Schedule]
LeafMask = Union[Any, Callable[[optax.Params], Any]]
StackedAxes = Optional[Union[int, Any, Callable[[optax.Params], Any]]]

GRANULARITIES = ("tensor", "global")
SELECTIONS = ("auto", "exact", "bisect", "sample")
DEFAULT_SAMPLE_SIZE = 8192


class GradientMaskState(NamedTuple):
  """State of :func:`gradient_mask`: a few scalars, nothing parameter-sized.

  Attributes:
    count: number of updates done (drives a ``mask_ratio`` schedule and the
      sampler's randomness).
    rng_key: base PRNG key of the sampler (raw ``uint32[2]``, checkpointable).
    kept_fraction: fraction of the selected entries kept by the last update
      (estimated on the sample for sampled tensors); 1 before any update.
  """

  count: jax.Array
  rng_key: jax.Array
  kept_fraction: jax.Array


class RandomMaskState(NamedTuple):
  """State of :func:`random_mask`; fields as in :class:`GradientMaskState`."""

  count: jax.Array
  rng_key: jax.Array
  kept_fraction: jax.Array


def _check_ratio(mask_ratio) -> None:
  """Refuses a concrete ratio (a Python or NumPy number, a JAX array) outside [0, 1), NaN
  included; a schedule or a traced value (``inject_hyperparams`` under ``jit``) is not known
  here."""
  if callable(mask_ratio) or isinstance(mask_ratio, jax.core.Tracer):
    return
  ratio = np.asarray(mask_ratio)
  if ratio.ndim or ratio.dtype.kind not in "iuf" or not 0.0 <= float(ratio) < 1.0:
    raise ValueError(
      f"mask_ratio must be a number in [0, 1) (the fraction of entries zeroed), got {mask_ratio!r}."
    )


def _ratio_at(mask_ratio: MaskRatio, count: jax.Array):
  return mask_ratio(count) if callable(mask_ratio) else mask_ratio


def replicate_like(params, state):
  """Places ``state`` (small, parameter-independent arrays) replicated on the
  mesh of the first concretely ``NamedSharding``-ed parameter, where a jitted
  update returns it; a no-op otherwise (unsharded, abstract or traced)."""
  for leaf in jax.tree_util.tree_leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if (
      isinstance(leaf, jax.Array)
      and not isinstance(leaf, jax.core.Tracer)
      and isinstance(sharding, jax.sharding.NamedSharding)
    ):
      return jax.device_put(
        state, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      )
  return state


def init_state(state_type, seed, params, **fields):
  return replicate_like(
    params,
    state_type(
      count=jnp.zeros([], jnp.int32),
      rng_key=jax.random.PRNGKey(seed),
      kept_fraction=jnp.ones([], jnp.float32),
      **fields,
    ),
  )


def init_mask_state(seed, params, telemetry: bool, mask, stacked_axes):
  """:class:`GradientMaskState`, or with ``telemetry`` a
  :class:`GradientMaskTelemetryState` with one row per selected tensor (per
  stacked slice) of ``params``."""
  if not telemetry:
    return init_state(GradientMaskState, seed, params)
  leaf, layer = telemetry_rows(params, mask, stacked_axes)
  rows = len(leaf)
  return init_state(
    _telemetry.GradientMaskTelemetryState,
    seed,
    params,
    telemetry=_telemetry.MaskTelemetry(
      kept_fraction=jnp.ones(rows, jnp.float32),
      threshold=jnp.zeros(rows, jnp.float32),
      kept_energy=jnp.ones(rows, jnp.float32),
      jaccard=jnp.full(rows, jnp.nan, jnp.float32),
      coverage=jnp.zeros(rows, jnp.float32),
      leaf=jnp.asarray(leaf),
      layer=jnp.asarray(layer),
    ),
    sample_kept=jnp.zeros((rows, _telemetry.TELEMETRY_SAMPLE_SIZE), jnp.bool_),
    sample_ever_kept=jnp.zeros((rows, _telemetry.TELEMETRY_SAMPLE_SIZE), jnp.bool_),
  )


def telemetry_rows(params, mask: Optional[LeafMask], stacked_axes: StackedAxes):
  """``(leaf, layer)`` int32 arrays, one entry per telemetry row: each selected
  leaf of ``params`` in ``tree_leaves`` order, one row per stacked slice
  (layer -1 for a leaf without stacked axes)."""
  if not any(hasattr(x, "shape") for x in jax.tree_util.tree_leaves(params)):
    # optax.tree_map_params inits with a placeholder for the parameters: no
    # rows, and the same state structure as the real one.
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  check_stacked_axes(stacked_axes)
  leaves, treedef, selected = selected_leaves(params, mask)
  stacked = leaf_stacked_axes(params, leaves, treedef, selected, stacked_axes)
  leaf, layer = [], []
  for i, (x, chosen, axes) in enumerate(zip(leaves, selected, stacked)):
    if chosen:
      rows = math.prod(x.shape[:axes])
      leaf += [i] * rows
      layer += list(range(rows)) if axes else [-1]
  return np.asarray(leaf, np.int32), np.asarray(layer, np.int32)


def leaf_values(option, updates, treedef) -> list:
  """Flat per-leaf values of ``option``: a pytree prefix of ``updates`` (or a
  single value) or a callable of ``updates`` returning one, as in
  ``optax.masked``."""
  tree = option(updates) if callable(option) else option
  broadcast = jax.tree_util.tree_map(
    lambda value, sub: jax.tree_util.tree_map(lambda _: value, sub), tree, updates
  )
  return treedef.flatten_up_to(broadcast)


def selected_leaves(updates, mask: Optional[LeafMask]):
  """Flat leaves of ``updates``, their treedef and which ones get masked.

  A leaf is masked when it is a non-empty floating-point array chosen by
  ``mask`` (a pytree prefix of bools or a callable, as in ``optax.masked``).
  """
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  chosen = (
    [True] * len(leaves) if mask is None else [bool(m) for m in leaf_values(mask, updates, treedef)]
  )
  selected = [
    c and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.size > 0
    for c, x in zip(chosen, leaves)
  ]
  return leaves, treedef, selected


def check_stacked_axes(stacked_axes: StackedAxes) -> None:
  if not callable(stacked_axes) and any(
    not isinstance(a, (int, np.integer)) or a < 0 for a in jax.tree_util.tree_leaves(stacked_axes)
  ):
    raise ValueError(
      "stacked_axes must be an int >= 0, a pytree prefix of them or a "
      f"callable returning one, got {stacked_axes!r} (under "
      "optax.inject_hyperparams, pass static_args=('stacked_axes',))."
    )


def leaf_stacked_axes(updates, leaves, treedef, selected, stacked_axes: StackedAxes) -> list[int]:
  """Number of leading stacked axes of each leaf (0 for leaves not
  selected, and for all when ``stacked_axes`` is ``None``), checked against
  the leaf's rank."""
  axes = (
    leaf_values(stacked_axes, updates, treedef) if stacked_axes is not None else [0] * len(leaves)
  )
  for x, a, s in zip(leaves, axes, selected):
    if s and not (isinstance(a, (int, np.integer)) and 0 <= a <= x.ndim):
      raise ValueError(
        f"stacked_axes must be an int in [0, ndim] for each leaf, got "
        f"{a!r} for a leaf of shape {x.shape}."
      )
  return [int(a) if s else 0 for a, s in zip(axes, selected)]


def as_rows(x: jax.Array, stacked_axes: int) -> jax.Array:
  """``x`` as ``[rows, ...]``, one row per independent tensor: its stacked
  axes merged (a free reshape: they lead), or a new axis if it has none."""
  return x.reshape((-1,) + x.shape[stacked_axes:])


class Selector(NamedTuple):
  """The static options of the threshold selection, validated by :func:`keep_mask_fn`
  (see :func:`gradient_mask` for their meaning)."""

  granularity: str
  selection: str
  sample_size: int
  axis_name: Any
  telemetry_size: int  # fixed sampled entries per row for telemetry; 0: none


class _Rows(NamedTuple):
  """The gradients as rows (one per stacked slice of each tensor) and the rows'
  magnitude keys stacked into blocks of equal shape and dtype."""

  tensors: list  # each gradient as [rows, ...]
  keys: list  # each tensor's row keys: of all its entries, or of its sampled ones
  methods: list  # per tensor: "bisect", "exact" or "sample"
  sizes: list  # per tensor: the entries of one row, over all shards
  counted: list  # per tensor: the entries a row's keys count, over all shards
  offsets: np.ndarray  # each tensor's first row, then the number of rows
  row_tensor: np.ndarray  # each row's tensor
  blocks: list  # [rows, ...] keys of equal shape and dtype, stacked
  members: list  # each block's rows (indices among all rows)
  shards: int  # shards of the axis the gradients are split over (1: not split)
  key_fn: Callable  # gradient entries -> magnitude keys


def _as_keyed_rows(grads, stacked_axes, selector: Selector, rng) -> _Rows:
  """The rows of ``grads`` and their keys, sampled where the selection samples.

  Rows of equal shape and dtype are stacked into blocks, so the whole
  selection is a handful of ops whatever the number of tensors (fast to
  compile, one all-reduce per bisection step); an unsampled stacked leaf is a
  block already and stays one.
  """
  axis_name, sample_size = selector.axis_name, selector.sample_size
  shards = 1 if axis_name is None else lax.axis_size(axis_name)
  tensors = [as_rows(g, a) for g, a in zip(grads, stacked_axes)]
  num_rows = [t.shape[0] for t in tensors]
  offsets = np.cumsum([0] + num_rows)
  # Entries of one row, over all shards.
  sizes = [math.prod(t.shape[1:]) * shards for t in tensors]
  if selector.selection == "auto":
    methods = ["bisect" if n <= sample_size else "sample" for n in sizes]
  else:
    methods = [selector.selection] * len(grads)
  per_tensor = selector.granularity == "tensor"
  key_fn = _selection.magnitude_key if per_tensor else _selection.magnitude_key_f32

  keys = list(tensors)
  sampled = [i for i, m in enumerate(methods) if m == "sample"]
  if sampled:
    if axis_name is not None:
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    drawn = _selection.sample_entries([tensors[i] for i in sampled], sample_size, rng)
    for i, sample in zip(sampled, drawn):
      keys[i] = sample
  keys = [key_fn(r) for r in keys]
  by_layout = {}
  for i, r in enumerate(keys):
    alone = stacked_axes[i] > 0 and methods[i] != "sample"  # a block already: no copy
    by_layout.setdefault((i if alone else None, r.shape[1:], jnp.dtype(r.dtype)), []).append(i)
  layout = list(by_layout.values())
  return _Rows(
    tensors=tensors,
    keys=keys,
    methods=methods,
    sizes=sizes,
    # Entries each row stands for, counted over all shards.
    counted=[sample_size * shards if m == "sample" else n for m, n in zip(methods, sizes)],
    offsets=offsets,
    row_tensor=np.repeat(np.arange(len(grads)), num_rows),
    blocks=[keys[m[0]] if len(m) == 1 else jnp.concatenate([keys[i] for i in m]) for m in layout],
    members=[
      np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in m]).astype(np.int32)
      for m in layout
    ],
    shards=shards,
    key_fn=key_fn,
  )


def _threshold_dtype(rows: _Rows):
  return jnp.int64 if any(b.dtype.itemsize > 4 for b in rows.blocks) else jnp.int32


def _per_tensor_thresholds(rows: _Rows, ratio, selector: Selector) -> jax.Array:
  """The threshold key of each row, keeping ``1 - ratio`` of each tensor's entries."""
  axis_name, total = selector.axis_name, rows.offsets[-1]
  # Count limbs [2, rows]: ranks may exceed int32 (see _selection).
  ranks = jnp.repeat(
    jnp.stack(
      [_selection.count_limbs(_selection.num_masked(ratio, c)) for c in rows.counted], axis=1
    ),
    np.diff(rows.offsets),
    axis=1,
    total_repeat_length=total,
  )
  if selector.selection == "exact":
    thresholds = jnp.zeros(total, _threshold_dtype(rows))
    for block, rows_of in zip(rows.blocks, rows.members):
      found = _selection.sorted_keys(block, ranks[:, rows_of], axis_name)
      thresholds = thresholds.at[rows_of].set(found.astype(thresholds.dtype))
    return thresholds
  targets = _selection.limbs_plus_one(ranks)
  if axis_name is not None:  # one loop: one all-reduce of all counts per step
    return _selection.bisect(
      _selection.CountingProblem(rows.blocks, rows.members, None, targets), axis_name
    )
  thresholds = jnp.zeros(total, _threshold_dtype(rows))  # no communication: block by block
  for block, rows_of in zip(rows.blocks, rows.members):
    thresholds = thresholds.at[rows_of].set(
      _selection.bisect_rows(block, targets[:, rows_of]).astype(thresholds.dtype)
    )
  return thresholds


def _global_threshold(rows: _Rows, ratio, selector: Selector) -> jax.Array:
  """One threshold key for all rows, keeping ``1 - ratio`` of all entries."""
  axis_name, num_rows = selector.axis_name, np.diff(rows.offsets)
  total_entries = int(sum(n * r for n, r in zip(rows.sizes, num_rows)))
  rank = _selection.count_limbs(_selection.num_masked(ratio, total_entries))[:, None]
  if selector.selection == "exact":
    flat = jnp.concatenate([b.reshape(-1) for b in rows.blocks])
    threshold = _selection.sorted_keys(flat[None], rank, axis_name)[0]
  else:
    weights = None
    if "sample" in rows.methods:  # a sampled row's entries stand for the whole row
      weights = [
        np.asarray(
          [
            rows.sizes[rows.row_tensor[r]] / rows.shards / selector.sample_size
            if rows.methods[rows.row_tensor[r]] == "sample"
            else 1.0
            for r in rows_of
          ]
        )
        for rows_of in rows.members
      ]
    problem = _selection.CountingProblem(
      rows.blocks,
      [np.zeros_like(m) for m in rows.members],
      weights,
      _selection.limbs_plus_one(rank),
    )
    threshold = _selection.bisect(problem, axis_name)[0]
  return jnp.broadcast_to(threshold, [rows.offsets[-1]])


def _kept_entries(rows: _Rows, thresholds: jax.Array, axis_name) -> jax.Array:
  """The number of kept entries, counted on the keys (estimated for sampled tensors)."""
  kept = 0.0
  for block, rows_of in zip(rows.blocks, rows.members):
    row_threshold = thresholds[rows_of].astype(block.dtype)
    row_threshold = row_threshold.reshape(row_threshold.shape + (1,) * (block.ndim - 1))
    row_kept = _selection.limbs_to_float(
      _selection.psum_limbs(_selection.count_rows(block >= row_threshold), axis_name)
    )
    tensor_of = rows.row_tensor[rows_of]
    scale = np.asarray([rows.sizes[t] / rows.counted[t] for t in tensor_of], np.float32)
    kept = kept + jnp.sum(row_kept * scale)
  return kept


def magnitude_keep_masks(grads, stacked_axes, ratio, selector: Selector, rng, telemetry_rng):
  """Keep masks ``|g| >= T`` for a list of gradient arrays.

  Each tensor contributes one *row* per stacked slice (``stacked_axes[i]``
  leading axes index independent tensors): its magnitude keys, or the keys
  of ``selector.sample_size`` sampled entries (:func:`_as_keyed_rows`). The
  threshold is per row (``granularity="tensor"``) or one for all.

  Returns ``(keep, kept, statistics)``: one boolean array per gradient, the
  (estimated for sampled tensors) total number of kept entries and, when
  ``selector.telemetry_size`` is set, the :class:`RowStatistics` of the masks
  (else ``None``).
  """
  rows = _as_keyed_rows(grads, stacked_axes, selector, rng)
  if selector.granularity == "tensor":
    thresholds = _per_tensor_thresholds(rows, ratio, selector)
  else:
    thresholds = _global_threshold(rows, ratio, selector)
  # Masking nothing must be the identity, whatever the selector estimated.
  thresholds = jnp.where(jnp.asarray(ratio) > 0, thresholds, 0)
  keep, row_keep, row_keys = [], [], []
  for i, g in enumerate(grads):
    # Rows of unsampled tensors already hold their keys.
    keys = rows.key_fn(rows.tensors[i]) if rows.methods[i] == "sample" else rows.keys[i]
    row_threshold = thresholds[rows.offsets[i] : rows.offsets[i + 1]].astype(keys.dtype)
    row_keep.append(keys >= row_threshold.reshape((-1,) + (1,) * (keys.ndim - 1)))
    row_keys.append(row_threshold)
    keep.append(row_keep[-1].reshape(g.shape))
  kept = _kept_entries(rows, thresholds, selector.axis_name)
  statistics = None
  if selector.telemetry_size:
    statistics = _telemetry.row_statistics(rows, row_keep, row_keys, selector, telemetry_rng)
  return keep, kept, statistics


# gradient_mask's options, one keyword each as there, validated here once for both the
# transformation and accumulate_and_mask.
def keep_mask_fn(
  mask_ratio,
  *,
  granularity="tensor",
  selection="auto",
  sample_size=None,
  mask=None,
  axis_name=None,
  stacked_axes: StackedAxes = None,
  telemetry_size: int = 0,
):
  """Validates :func:`gradient_mask`'s options and returns
  ``keep_masks(updates, count, rng_key) -> (keep, kept_fraction, statistics)``:
  a pytree of boolean masks (``None`` for leaves passed through), the
  fraction of selected entries kept and, with ``telemetry_size`` sampled
  entries per row, the :class:`RowStatistics` of the masks (else ``None``)."""
  _check_ratio(mask_ratio)
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
  if sample_size is None:
    sample_size = DEFAULT_SAMPLE_SIZE
  if not isinstance(sample_size, (int, np.integer)) or sample_size < 1:
    raise ValueError(
      f"sample_size must be a positive Python int, got {sample_size!r} "
      "(under optax.inject_hyperparams, pass static_args=('sample_size',))."
    )
  check_stacked_axes(stacked_axes)
  selector = Selector(granularity, selection, int(sample_size), axis_name, telemetry_size)

  def keep_masks(updates, count, rng_key):
    ratio = _ratio_at(mask_ratio, count)
    leaves, treedef, selected = selected_leaves(updates, mask)
    chosen = [x for x, s in zip(leaves, selected) if s]
    stacked = leaf_stacked_axes(updates, leaves, treedef, selected, stacked_axes)
    keep = [None] * len(leaves)
    chosen_stacked = [a for a, s in zip(stacked, selected) if s]
    if not chosen or (isinstance(ratio, (int, float)) and ratio == 0):
      statistics = None
      if telemetry_size:
        statistics = _telemetry.all_kept_statistics(chosen, chosen_stacked, telemetry_size)
      return treedef.unflatten(keep), jnp.ones([], jnp.float32), statistics
    chosen_keep, kept, statistics = magnitude_keep_masks(
      chosen,
      chosen_stacked,
      ratio,
      selector,
      rng=jax.random.fold_in(rng_key, count),
      # A key of its own, the same at every update: the sample stays fixed.
      telemetry_rng=jax.random.split(rng_key)[1] if telemetry_size else None,
    )
    chosen_keep = iter(chosen_keep)
    keep = [next(chosen_keep) if s else None for s in selected]
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    total = float(sum(x.size for x in chosen) * shards)
    return treedef.unflatten(keep), jnp.asarray(kept / total, jnp.float32), statistics

  return keep_masks


def apply_keep_masks(updates, keep):
  """Zeroes the entries of ``updates`` where ``keep`` is False."""
  return jax.tree_util.tree_map(
    lambda u, k: u if k is None else jnp.where(k, u, jnp.zeros_like(u)),
    updates,
    keep,
    is_leaf=lambda x: x is None,
  )


# One keyword-only option per choice, as optax's own transformations take them (a user
# reads and overrides each by name); the docstring is most of the length.
def gradient_mask(
  mask_ratio: MaskRatio,
  *,
  granularity: str = "tensor",
  selection: str = "auto",
  sample_size: Optional[int] = None,
  mask: Optional[LeafMask] = None,
  axis_name: Optional[str] = None,
  stacked_axes: StackedAxes = None,
  seed: int = 0,
  telemetry: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Zeroes the gradient entries of smallest magnitude (Gradient-Mask Tuning).

  For each selected tensor (or, with ``granularity="global"``, for all of them
  together) with :math:`n` entries and mask ratio :math:`r`, let :math:`T` be
  the value of rank :math:`\lfloor r n \rfloor` (0-based, ascending) of
  :math:`|g|`. Then

  .. math::
    M(g)_i = \begin{cases} g_i & |g_i| \ge T \\ 0 & \text{otherwise.}
    \end{cases}

  Ties at :math:`T` are kept, so the kept fraction may exceed :math:`1 - r`.
  A leaf with ``stacked_axes`` :math:`= s` holds independent tensors stacked
  along its :math:`s` leading axes (scanned layers: ``[num_layers, d, h]``
  with :math:`s = 1`); with ``granularity="tensor"`` each slice
  :math:`g_l = g[l]` is a tensor of its own, masked with :math:`T_l` of rank
  :math:`\lfloor r n_l \rfloor` in :math:`|g_l|`, exactly as if the layers
  were separate leaves. The mask is recomputed at every update. Put it first
  in a chain, before the
  optimizer, as the paper does: masked entries then still move through the
  optimizer's momentum and weight decay (see :func:`gmt` with
  ``mask_updates=True`` to hold them still).

  Selection of :math:`T` (see ``gmt_optax._selection``):

  * ``"exact"``: sort (reference only: a sharded tensor is all-gathered).
  * ``"bisect"``: exact :math:`T` by bisection on the bit pattern of
    :math:`|g|`: 31 counting passes for float32, 15 for bfloat16/float16; no
    sort, no gather, one small all-reduce per pass when sharded. Counts are
    exact without x64 up to :math:`2^{43}` entries per threshold (pairs of
    int32, see ``gmt_optax._selection``), so a global threshold over a 7B
    model is exact too; with a traced ``mask_ratio`` the rank
    :math:`\lfloor r n \rfloor` itself is a float32 (within relative
    :math:`2^{-24}` once :math:`r n > 2^{24}`).
  * ``"sample"``: bisection over ``sample_size`` entries drawn uniformly with
    replacement. The masked fraction is within
    :math:`\varepsilon = \sqrt{\ln(2/\delta) / (2m)} + 1/m` of :math:`r` with
    probability :math:`1-\delta` (DKW inequality; :math:`m` = total sample
    size, :math:`\varepsilon \approx 2.2\%` for :math:`m=8192,
    \delta=10^{-3}`), when the tensor has no ties at :math:`T`.
  * ``"auto"`` (default): ``"bisect"`` for tensors of at most ``sample_size``
    entries, ``"sample"`` for larger ones.

  NaN and infinite entries order above every finite magnitude: they are kept
  (so a ``NaN`` still reaches the loss checks downstream) and do not change
  the threshold of the finite entries unless they outnumber the kept
  fraction.

  Args:
    mask_ratio: fraction of entries zeroed, in ``[0, 1)``; a float, a scalar
      array (e.g. under ``optax.inject_hyperparams``) or an optax schedule of
      the update count.
    granularity: ``"tensor"`` (one threshold per leaf) or ``"global"`` (one
      threshold over all selected leaves).
    selection: ``"auto"``, ``"exact"``, ``"bisect"`` or ``"sample"``.
    sample_size: entries sampled per tensor (``"sample"``/``"auto"``);
      ``None`` means ``DEFAULT_SAMPLE_SIZE``. Static: under
      ``optax.inject_hyperparams`` pass it in ``static_args`` (and ``mask``
      too when it is a callable, which inject_hyperparams would otherwise take
      for a schedule).
    mask: which leaves to mask, as in ``optax.masked``: a pytree (prefix) of
      bools or a callable of the updates returning one. Other leaves, and all
      non-floating-point or empty leaves, pass through unchanged.
    axis_name: set when updating local shards inside ``shard_map`` or
      ``pmap``: counts and samples are reduced over this axis so every shard
      uses the threshold of the whole tensor. Leave ``None`` under
      ``jax.jit`` with sharded arrays (the partitioner inserts the reductions).
    stacked_axes: number of leading axes of a leaf that index independent
      tensors (e.g. 1 for scanned layers): an int for all leaves, a pytree
      prefix of ints or a callable of the updates returning one (as
      ``mask``). Each slice gets its own threshold with
      ``granularity="tensor"`` and its own ``sample_size`` samples (and
      ``"auto"`` choice) with either granularity. Under ``axis_name`` the
      stacked axes must not be split over that axis.
      ``None`` (default) means 0 for every leaf. Static: under
      ``optax.inject_hyperparams`` pass it in ``static_args``.
    seed: seed of the sampler.
    telemetry: also record, per tensor and per stacked slice, what the mask
      did (kept fraction, threshold, kept gradient energy, overlap with the
      previous update's mask and coverage on a fixed sample): see
      :class:`MaskTelemetry` and :func:`mask_telemetry`. Off, the state and
      the compiled update are exactly those without it. A Python bool
      (``optax.inject_hyperparams`` keeps bools static).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`GradientMaskState` (with ``telemetry``, a
    :class:`GradientMaskTelemetryState`).

  Example:
    >>> import jax.numpy as jnp, optax, gmt_optax
    >>> tx = optax.chain(gmt_optax.gradient_mask(0.5), optax.sgd(1.0))
    >>> params = {"w": jnp.array([1.0, -4.0, 2.0, -3.0])}
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates["w"]
    Array([-0.,  4., -0.,  3.], dtype=float32)

    Scanned layers: two layers' kernels stacked in one ``[2, 2, 2]`` leaf
    keep one threshold per layer, while the unstacked embedding has its own:

    >>> kernel = jnp.array([[[1.0, 2.0], [3.0, 4.0]],
    ...                     [[40.0, 30.0], [20.0, 10.0]]])
    >>> grads = {"embed": jnp.array([1.0, -2.0, 3.0, -4.0]),
    ...          "layers": {"kernel": kernel}}
    >>> tx = gmt_optax.gradient_mask(
    ...     0.5, stacked_axes={"embed": 0, "layers": 1})
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["layers"]["kernel"]
    Array([[[ 0.,  0.],
            [ 3.,  4.]],
    <BLANKLINE>
           [[40., 30.],
            [ 0.,  0.]]], dtype=float32)

  References:
    Li et al., `Gradient-Mask Tuning Elevates the Upper Limits of LLM
    Performance <https://arxiv.org/abs/2406.15330>`_, 2024.
  """
  keep_masks = keep_mask_fn(
    mask_ratio,
    granularity=granularity,
    selection=selection,
    sample_size=sample_size,
    mask=mask,
    axis_name=axis_name,
    stacked_axes=stacked_axes,
    telemetry_size=_telemetry.telemetry_sample_size(telemetry),
  )

  def init_fn(params):
    return init_mask_state(seed, params, telemetry, mask, stacked_axes)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    keep, kept, statistics = keep_masks(updates, state.count, state.rng_key)
    return apply_keep_masks(updates, keep), _telemetry.next_mask_state(state, kept, statistics)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def random_mask(
  mask_ratio: MaskRatio,
  *,
  seed: int = 0,
  mask: Optional[LeafMask] = None,
  axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Zeroes a random fraction of each gradient (the GMT control baseline).

  Each selected entry is zeroed independently with probability :math:`r`,
  re-drawn at every update: the same expected sparsity as
  :func:`gradient_mask` with no information from :math:`|g|`.

  Args:
    mask_ratio: probability of zeroing an entry, in ``[0, 1)``; a float, a
      scalar array or a schedule of the update count.
    seed: seed of the random masks.
    mask: which leaves to mask, as in :func:`gradient_mask`.
    axis_name: set inside ``shard_map``/``pmap`` so shards draw different
      masks and the kept fraction covers the whole tensor.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`RandomMaskState`.

  Example:
    >>> import optax, gmt_optax
    >>> tx = optax.chain(gmt_optax.random_mask(0.5), optax.adamw(1e-5))
  """
  _check_ratio(mask_ratio)

  def init_fn(params):
    return init_state(RandomMaskState, seed, params)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    ratio = _ratio_at(mask_ratio, state.count)
    leaves, treedef, selected = selected_leaves(updates, mask)
    rng = jax.random.fold_in(state.rng_key, state.count)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    seeds = jax.random.bits(rng, (len(leaves),), jnp.uint32)
    keep = [
      _selection.uniform_like(x, seeds[i]) >= ratio if s else None
      for i, (x, s) in enumerate(zip(leaves, selected))
    ]
    kept = sum(
      _selection.limbs_to_float(_selection.psum_limbs(_selection.count_rows(k[None]), axis_name))[0]
      for k in keep
      if k is not None
    )
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    total = sum(x.size for x, s in zip(leaves, selected) if s) * shards
    kept_fraction = jnp.asarray(kept / total, jnp.float32) if total else jnp.ones([], jnp.float32)
    return apply_keep_masks(updates, treedef.unflatten(keep)), state._replace(
      count=optax.safe_increment(state.count), kept_fraction=kept_fraction
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kept_fraction(opt_state) -> Optional[jax.Array]:
  """The last update's kept fraction found anywhere in an optimizer state.

  Looks through nested states (``optax.chain``, ``inject_hyperparams``,
  :func:`gmt`, ``nnx.Optimizer``'s ``opt_state``) for the first
  :class:`GradientMaskState`, :class:`GradientMaskTelemetryState` or
  :class:`RandomMaskState`; ``None`` if there is none (e.g. plain SFT).
  """
  state = _telemetry.first_state(
    opt_state, (GradientMaskState, _telemetry.GradientMaskTelemetryState, RandomMaskState)
  )
  return None if state is None else state.kept_fraction
