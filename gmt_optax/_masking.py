"""Gradient-magnitude masking (GMT) and its same-sparsity random baseline."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gmt_optax import _selection

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


def init_state(state_type, seed, params):
  return replicate_like(
    params,
    state_type(
      count=jnp.zeros([], jnp.int32),
      rng_key=jax.random.PRNGKey(seed),
      kept_fraction=jnp.ones([], jnp.float32),
    ),
  )


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


def magnitude_keep_masks(
  grads, ratio, *, granularity, selection, sample_size, rng, axis_name, stacked_axes
):
  """Keep masks ``|g| >= T`` for a list of gradient arrays.

  Each tensor contributes one *row* per stacked slice (``stacked_axes[i]``
  leading axes index independent tensors): its magnitude keys, or the keys
  of ``sample_size`` sampled entries. Rows of equal shape and dtype are
  stacked into blocks, so the whole selection is a handful of ops whatever
  the number of tensors (fast to compile, one all-reduce per bisection
  step); an unsampled stacked leaf is a block already and stays one.

  Returns ``(keep, kept)``: one boolean array per gradient and the (estimated
  for sampled tensors) total number of kept entries.
  """
  shards = 1 if axis_name is None else lax.axis_size(axis_name)
  tensors = [as_rows(g, a) for g, a in zip(grads, stacked_axes)]
  num_rows = [t.shape[0] for t in tensors]
  offsets = np.cumsum([0] + num_rows)
  # Entries of one row, over all shards.
  sizes = [math.prod(t.shape[1:]) * shards for t in tensors]
  if selection == "auto":
    methods = ["bisect" if n <= sample_size else "sample" for n in sizes]
  else:
    methods = [selection] * len(grads)
  key_fn = _selection.magnitude_key if granularity == "tensor" else _selection.magnitude_key_f32

  rows = list(tensors)
  sampled = [i for i, m in enumerate(methods) if m == "sample"]
  if sampled:
    if axis_name is not None:
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    drawn = _selection.sample_entries([tensors[i] for i in sampled], sample_size, rng)
    for i, sample in zip(sampled, drawn):
      rows[i] = sample
  rows = [key_fn(r) for r in rows]
  # Rows of equal shape and dtype stack into one block (one op for many
  # tensors); an unsampled stacked leaf is a block already: no copy.
  by_layout = {}
  for i, r in enumerate(rows):
    alone = stacked_axes[i] > 0 and methods[i] != "sample"
    by_layout.setdefault((i if alone else None, r.shape[1:], jnp.dtype(r.dtype)), []).append(i)
  layout = list(by_layout.values())
  blocks = [rows[m[0]] if len(m) == 1 else jnp.concatenate([rows[i] for i in m]) for m in layout]
  members = [
    np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in m]).astype(np.int32)
    for m in layout
  ]
  row_tensor = np.repeat(np.arange(len(grads)), num_rows)
  # Entries each row stands for, counted over all shards.
  counted = [sample_size * shards if m == "sample" else n for m, n in zip(methods, sizes)]

  threshold_dtype = jnp.int64 if any(b.dtype.itemsize > 4 for b in blocks) else jnp.int32
  if granularity == "tensor":
    # Count limbs [2, rows]: ranks may exceed int32 (see _selection).
    ranks = jnp.repeat(
      jnp.stack([_selection.count_limbs(_selection.num_masked(ratio, c)) for c in counted], axis=1),
      np.asarray(num_rows),
      axis=1,
      total_repeat_length=offsets[-1],
    )
    if selection == "exact":
      thresholds = jnp.zeros(offsets[-1], threshold_dtype)
      for block, rows_of in zip(blocks, members):
        found = _selection.sorted_keys(block, ranks[:, rows_of], axis_name)
        thresholds = thresholds.at[rows_of].set(found.astype(thresholds.dtype))
    else:
      targets = _selection.limbs_plus_one(ranks)
      if axis_name is None:  # no communication: search block by block
        thresholds = jnp.zeros(offsets[-1], threshold_dtype)
        for block, rows_of in zip(blocks, members):
          thresholds = thresholds.at[rows_of].set(
            _selection.bisect_rows(block, targets[:, rows_of]).astype(threshold_dtype)
          )
      else:  # one loop: one all-reduce of all counts per step
        thresholds = _selection.bisect(
          _selection.CountingProblem(blocks, members, None, targets), axis_name
        )
  else:
    rank = _selection.count_limbs(
      _selection.num_masked(ratio, int(sum(n * r for n, r in zip(sizes, num_rows))))
    )[:, None]
    if selection == "exact":
      flat = jnp.concatenate([b.reshape(-1) for b in blocks])
      threshold = _selection.sorted_keys(flat[None], rank, axis_name)[0]
    else:
      weights = None
      if sampled:
        weights = [
          np.asarray(
            [
              sizes[row_tensor[r]] / shards / sample_size
              if methods[row_tensor[r]] == "sample"
              else 1.0
              for r in rows_of
            ]
          )
          for rows_of in members
        ]
      threshold = _selection.bisect(
        _selection.CountingProblem(
          blocks, [np.zeros_like(m) for m in members], weights, _selection.limbs_plus_one(rank)
        ),
        axis_name,
      )[0]
    thresholds = jnp.broadcast_to(threshold, [offsets[-1]])

  # Masking nothing must be the identity, whatever the selector estimated.
  thresholds = jnp.where(jnp.asarray(ratio) > 0, thresholds, 0)
  keep = []
  for i, g in enumerate(grads):
    # Rows of unsampled tensors already hold their keys.
    keys = key_fn(tensors[i]) if methods[i] == "sample" else rows[i]
    row_threshold = thresholds[offsets[i] : offsets[i + 1]].astype(keys.dtype)
    keep.append((keys >= row_threshold.reshape((-1,) + (1,) * (keys.ndim - 1))).reshape(g.shape))
  kept = 0.0
  for block, rows_of in zip(blocks, members):
    row_threshold = thresholds[rows_of].astype(block.dtype)
    row_threshold = row_threshold.reshape(row_threshold.shape + (1,) * (block.ndim - 1))
    row_kept = _selection.limbs_to_float(
      _selection.psum_limbs(_selection.count_rows(block >= row_threshold), axis_name)
    )
    scale = np.asarray([sizes[row_tensor[r]] / counted[row_tensor[r]] for r in rows_of], np.float32)
    kept = kept + jnp.sum(row_kept * scale)
  return keep, kept


def keep_mask_fn(
  mask_ratio,
  *,
  granularity="tensor",
  selection="auto",
  sample_size=None,
  mask=None,
  axis_name=None,
  stacked_axes: StackedAxes = None,
):
  """Validates :func:`gradient_mask`'s options and returns
  ``keep_masks(updates, count, rng_key) -> (keep, kept_fraction)``: a pytree
  of boolean masks (``None`` for leaves passed through) and the fraction of
  selected entries kept."""
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
  sample_size = int(sample_size)
  check_stacked_axes(stacked_axes)

  def keep_masks(updates, count, rng_key):
    ratio = _ratio_at(mask_ratio, count)
    leaves, treedef, selected = selected_leaves(updates, mask)
    chosen = [x for x, s in zip(leaves, selected) if s]
    stacked = leaf_stacked_axes(updates, leaves, treedef, selected, stacked_axes)
    keep = [None] * len(leaves)
    if not chosen or (isinstance(ratio, (int, float)) and ratio == 0):
      return treedef.unflatten(keep), jnp.ones([], jnp.float32)
    chosen_keep, kept = magnitude_keep_masks(
      chosen,
      ratio,
      granularity=granularity,
      selection=selection,
      sample_size=sample_size,
      rng=jax.random.fold_in(rng_key, count),
      axis_name=axis_name,
      stacked_axes=[a for a, s in zip(stacked, selected) if s],
    )
    chosen_keep = iter(chosen_keep)
    keep = [next(chosen_keep) if s else None for s in selected]
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    total = float(sum(x.size for x in chosen) * shards)
    return treedef.unflatten(keep), jnp.asarray(kept / total, jnp.float32)

  return keep_masks


def apply_keep_masks(updates, keep):
  """Zeroes the entries of ``updates`` where ``keep`` is False."""
  return jax.tree_util.tree_map(
    lambda u, k: u if k is None else jnp.where(k, u, jnp.zeros_like(u)),
    updates,
    keep,
    is_leaf=lambda x: x is None,
  )


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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`GradientMaskState`.

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
  )

  def init_fn(params):
    return init_state(GradientMaskState, seed, params)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    keep, kept = keep_masks(updates, state.count, state.rng_key)
    return apply_keep_masks(updates, keep), state._replace(
      count=optax.safe_increment(state.count), kept_fraction=kept
    )

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
  :class:`GradientMaskState` or :class:`RandomMaskState`; ``None`` if there is
  none (e.g. plain SFT).
  """
  is_mask_state = lambda x: isinstance(x, (GradientMaskState, RandomMaskState))
  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_mask_state):
    if is_mask_state(node):
      return node.kept_fraction
  return None
