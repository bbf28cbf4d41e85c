"""Threshold selection: find the magnitude of rank k without sorting gradients.

Every selector works on an integer *magnitude key*: the bit pattern of ``|x|``
read as a signed integer of the same width. For non-negative IEEE floats the
bit pattern orders like the value, and NaN (any payload, sign cleared) orders
above +inf, so one integer comparison ``key >= threshold`` is a total order
that never lets NaN poison the rest.

Three ways to find the threshold key of rank ``k`` (ascending, 0-based):

* ``exact``: sort the keys and index (reference; a sharded operand is
  all-gathered first, so it is slow on big tensors).
* ``bisect``: bisection over the key's bit range. Each step counts
  ``key <= mid``, a local reduction plus one scalar all-reduce when sharded;
  31 steps find the exact float32 value, 15 for bfloat16/float16.
* ``sample``: the same bisection over a random sample of ``m`` entries per
  tensor (drawn with one index vector per dimension, so a sharded tensor is
  never flattened or gathered), giving the rank within the DKW bound
  ``sqrt(log(2/delta) / (2 m))`` with probability ``1 - delta``.

All tensors' bisections run in ONE loop carrying a vector of thresholds, so a
sharded update does one small all-reduce per step, not one per tensor.

Counts and ranks go beyond int32 (a 7B model has 7e9 entries) without x64
as *count limbs*: an int32 pair ``[high, low]`` standing for
``high * 2**COUNT_LOW_BITS + low``, ``0 <= low < 2**COUNT_LOW_BITS``. A row is
counted in int32 over its trailing axes (fewer than 2**31 entries), then each
further sum (over its leading axes, shards, rows of a group) adds highs and
lows separately and carries: exact while a sum has at most
``2**(31 - COUNT_LOW_BITS)`` terms and a count stays below
``2**(31 + COUNT_LOW_BITS)`` (2**43, 8.8e12 entries), which is checked when
tracing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_KEY_DTYPES = {1: jnp.int8, 2: jnp.int16, 4: jnp.int32, 8: jnp.int64}
COUNT_LOW_BITS = 12
_LOW_MASK = (1 << COUNT_LOW_BITS) - 1
_MAX_TERMS = 1 << (31 - COUNT_LOW_BITS)
_MAX_COUNT = 1 << (31 + COUNT_LOW_BITS)
_INT32_COUNT_LIMIT = 1 << 31  # entries one int32 reduction may count


def magnitude_key(x: jax.Array) -> jax.Array:
  """Integer key ordered like ``|x|`` (NaN above inf), same width as ``x``."""
  return lax.bitcast_convert_type(jnp.abs(x), _KEY_DTYPES[x.dtype.itemsize])


def magnitude_key_f32(x: jax.Array) -> jax.Array:
  """:func:`magnitude_key` in the float32 domain, comparable across dtypes."""
  return magnitude_key(x.astype(jnp.float32))


def key_bits(dtype) -> int:
  """Number of significant bits of a magnitude key (the sign bit is 0)."""
  return jnp.dtype(dtype).itemsize * 8 - 1


def num_masked(ratio, n):
  """``floor(ratio * n)`` clipped to ``[0, n - 1]``: the rank of the threshold.

  A Python-number ratio gives a Python int computed in float64 (as numpy
  does, exact for any ``n`` below 2**43); a traced ratio (schedules,
  ``inject_hyperparams``) is computed in float32: an integer-valued float32,
  exact as a float32 product but within relative 2**-24 of the float64 rank
  once ``ratio * n`` exceeds 2**24 (:func:`count_limbs` converts it exactly).
  """
  if isinstance(ratio, (int, float)) and isinstance(n, (int, np.integer)):
    return min(max(int(np.floor(ratio * n)), 0), max(n - 1, 0))
  k = jnp.floor(jnp.asarray(ratio, jnp.float32) * jnp.asarray(n, jnp.float32))
  # The largest float32 not above n - 1: float32(n - 1) may round up.
  last = np.float32(max(n - 1, 0))
  if int(last) > n - 1:
    last = np.nextafter(last, np.float32(0))
  return jnp.clip(k, 0, last)


def _check_countable(terms: int, total: int) -> None:
  if terms > _MAX_TERMS or total >= _MAX_COUNT:
    raise ValueError(
      f"Cannot count exactly: a sum of {terms} terms up to {total} entries "
      f"(count limbs hold sums of at most {_MAX_TERMS} terms below "
      f"{_MAX_COUNT})."
    )


def _carry(limbs: jax.Array) -> jax.Array:
  """Count limbs ``[2, ...]`` with ``low`` reduced below 2**COUNT_LOW_BITS."""
  return jnp.stack([limbs[0] + (limbs[1] >> COUNT_LOW_BITS), limbs[1] & _LOW_MASK])


def count_limbs(count) -> jax.Array:
  """``[2, ...]`` int32 count limbs of a non-negative count: a Python int,
  an int32 array or an integer-valued float32 array (e.g. a traced rank)."""
  if isinstance(count, (int, np.integer)):
    _check_countable(1, count)
    return jnp.asarray([count >> COUNT_LOW_BITS, count & _LOW_MASK], jnp.int32)
  if jnp.issubdtype(count.dtype, jnp.integer):
    return jnp.stack([count >> COUNT_LOW_BITS, count & _LOW_MASK])
  # Scaling by a power of two, floor and the difference are exact in float32.
  high = jnp.floor(count * 2.0**-COUNT_LOW_BITS)
  return jnp.stack([high, count - high * 2.0**COUNT_LOW_BITS]).astype(jnp.int32)


def limbs_plus_one(limbs: jax.Array) -> jax.Array:
  """Carried count limbs plus one (``k + 1`` of a rank in limbs, where a
  float32 rank above 2**24 cannot add 1)."""
  return _carry(limbs.at[1].add(1))


def limbs_to_float(limbs: jax.Array) -> jax.Array:
  """The float32 value of count limbs (exact below 2**24)."""
  return limbs[0].astype(jnp.float32) * 2.0**COUNT_LOW_BITS + limbs[1].astype(jnp.float32)


def limbs_at_least(limbs: jax.Array, target: jax.Array) -> jax.Array:
  """``limbs >= target`` for carried count limbs."""
  return (limbs[0] > target[0]) | ((limbs[0] == target[0]) & (limbs[1] >= target[1]))


def psum_limbs(limbs: jax.Array, axis_name) -> jax.Array:
  """Count limbs summed over ``axis_name`` (one all-reduce), carried."""
  if axis_name is None:
    return limbs
  _check_countable(lax.axis_size(axis_name), 0)
  return _carry(lax.psum(limbs, axis_name))


def count_rows(hits: jax.Array) -> jax.Array:
  """Exact number of ``True`` entries in each row of ``hits[rows, ...]``, as
  ``[2, rows]`` count limbs.

  The trailing axes holding fewer than 2**31 entries (usually the whole row)
  are counted in int32 in one reduction; any leading row axes left are summed
  one at a time in limbs.
  """
  split = 1
  while math.prod(hits.shape[split:]) >= _INT32_COUNT_LIMIT:
    split += 1
  _check_countable(max(hits.shape[1:split], default=1), math.prod(hits.shape[1:]))
  limbs = count_limbs(jnp.sum(hits, axis=tuple(range(split, hits.ndim)), dtype=jnp.int32))
  for axis in reversed(range(2, split + 1)):
    limbs = _carry(jnp.sum(limbs, axis=axis))
  return limbs


def _hash32(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons): a cheap, well-mixed uint32 -> uint32 hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _uniform(counter: jax.Array, seed: jax.Array) -> jax.Array:
  """Uniform float32 in [0, 1) for each uint32 ``counter`` and ``seed``.

  Hashing the hashed counter xor the seed gives unrelated streams for
  different seeds; 24 bits make the float exactly uniform on its grid.
  """
  bits = _hash32(_hash32(counter) ^ seed)
  return (bits >> 8).astype(jnp.float32) * (2.0**-24)


def uniform_like(x: jax.Array, seed: jax.Array) -> jax.Array:
  """A uniform [0, 1) float32 per entry of ``x``: the hashed flat index.

  Built from iotas, so it is computed shard-locally when ``x`` is sharded,
  at a fraction of threefry's cost.
  """
  flat_index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    flat_index = flat_index + lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride *= x.shape[axis]
  return _uniform(flat_index, seed)


def sample_entries(
  blocks: Sequence[jax.Array], num_samples: int, rng: jax.Array
) -> list[jax.Array]:
  """``[rows, num_samples]`` entries of each block ``[rows, ...]``, drawn
  uniformly with replacement within each row.

  One index vector per dimension, so the gather stays local to each shard
  and needs only a sample-sized all-reduce, where ``ravel`` of a sharded
  array would all-gather it. All rows of a block share the sampled
  positions (each row's sample is still uniform over that row, which is all
  its own threshold needs) and are gathered one row at a time: a gather
  across rows makes the TPU compiler transpose the whole block first (7% more
  bytes for a whole Llama-3-8B train step). The indices come
  from a counter hashed with one threefry word per block and dimension:
  threefry for every index costs more than the rest of the selection on a
  CPU.
  """
  max_ndim = max(max(x.ndim - 1 for x in blocks), 1)
  seeds = jax.random.bits(rng, (len(blocks), max_ndim, 1), jnp.uint32)
  counter = jnp.arange(num_samples, dtype=jnp.uint32)
  samples = []
  for i, x in enumerate(blocks):
    if x.ndim == 1:  # rows of one entry
      samples.append(jnp.broadcast_to(x[:, None], (x.shape[0], num_samples)))
      continue
    index = tuple(
      jnp.minimum((_uniform(counter, seeds[i, d, 0]) * size).astype(jnp.int32), size - 1)
      for d, size in enumerate(x.shape[1:])
    )
    samples.append(lax.map(lambda row: row.at[index].get(mode="promise_in_bounds"), x))
  return samples


@dataclasses.dataclass(frozen=True)
class CountingProblem:
  """Batched bisection: find, per group ``g``, the smallest key ``t`` with
  ``sum over rows r of group g of weight_r * count(row_r <= t) >= target_g``.

  Attributes:
    blocks: integer key arrays ``[rows, ...]``; each row is one tensor (or a
      sample of one) and is counted over its other axes.
    row_groups: per block, the ``[rows]`` group index of each row.
    row_weights: per block, ``[rows]`` weight of one counted entry, or
      ``None`` for all ones and exact counting in count limbs.
    targets: ``[2, num_groups]`` count limbs (:func:`count_limbs`) of the
      count each group must reach (``k + 1``); compared in float32 when
      weighted.
  """

  blocks: Sequence[jax.Array]
  row_groups: Sequence[np.ndarray]
  row_weights: Optional[Sequence[np.ndarray]]
  targets: jax.Array


def bisect(problem: CountingProblem, axis_name=None) -> jax.Array:
  """Solves a :class:`CountingProblem`; returns ``[num_groups]`` int keys.

  ``axis_name``: counts are ``psum``-med over it (one all-reduce of a
  ``[2, rows]`` vector per step), so local shards agree on the threshold of
  the whole tensor.
  """
  num_groups = problem.targets.shape[1]
  row_groups = np.concatenate(problem.row_groups)
  row_bits = np.concatenate(
    [np.full(len(g), key_bits(b.dtype)) for b, g in zip(problem.blocks, problem.row_groups)]
  )
  group_bits = np.zeros(num_groups, np.int64)
  np.maximum.at(group_bits, row_groups, row_bits)
  steps = int(group_bits.max())
  carry_dtype = jnp.int64 if steps > 31 else jnp.int32
  lo = jnp.zeros(num_groups, carry_dtype)
  hi = jnp.asarray((1 << group_bits) - 1, carry_dtype)
  weights = (
    None
    if problem.row_weights is None
    else jnp.asarray(np.concatenate(problem.row_weights), jnp.float32)
  )
  if weights is None:
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    row_sizes = np.concatenate(
      [np.full(len(g), math.prod(b.shape[1:])) for b, g in zip(problem.blocks, problem.row_groups)]
    )
    group_sizes = np.bincount(row_groups, row_sizes * shards, num_groups)
    _check_countable(int(np.bincount(row_groups).max()), int(group_sizes.max()))
    targets = problem.targets
  else:
    targets = limbs_to_float(problem.targets)

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    counts = []
    for block, groups in zip(problem.blocks, problem.row_groups):
      row_mid = mid[groups].astype(block.dtype)
      row_mid = row_mid.reshape(row_mid.shape + (1,) * (block.ndim - 1))
      counts.append(count_rows(block <= row_mid))
    counts = psum_limbs(jnp.concatenate(counts, axis=1), axis_name)
    if weights is None:
      enough = limbs_at_least(
        _carry(jax.ops.segment_sum(counts.T, row_groups, num_groups).T), targets
      )
    else:
      enough = (
        jax.ops.segment_sum(limbs_to_float(counts) * weights, row_groups, num_groups) >= targets
      )
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = lax.fori_loop(0, steps, step, (lo, hi))
  return lo


def bisect_rows(
  block: jax.Array, targets: jax.Array, axis_name=None, chunk_bytes: int = 1 << 19
) -> jax.Array:
  """Per-row thresholds of one block (each row its own group; ``targets``
  are ``[2, rows]`` count limbs).

  Small rows (samples, small tensors) are searched a chunk of about
  ``chunk_bytes`` at a time, so the chunk stays in cache through the 31
  counting passes: 4x faster on a CPU for 272 sampled rows. Rows larger than
  that, or local shards (``axis_name``), use one loop so each step does a
  single all-reduce.
  """
  rows = block.shape[0]
  row_bytes = block[0].size * block.dtype.itemsize
  chunk = min(rows, chunk_bytes // max(row_bytes, 1))
  if axis_name is not None or chunk < 2 or chunk == rows:
    return bisect(CountingProblem([block], [np.arange(rows)], None, targets), axis_name)
  padding = -rows % chunk
  block = jnp.concatenate([block, block[:padding]])
  targets = jnp.concatenate([targets, targets[:, :padding]], axis=1)

  def search(chunk_and_targets):
    keys, chunk_targets = chunk_and_targets
    return bisect(CountingProblem([keys], [np.arange(chunk)], None, chunk_targets))

  found = lax.map(
    search,
    (block.reshape((-1, chunk) + block.shape[1:]), targets.reshape(2, -1, chunk).swapaxes(0, 1)),
  )
  return found.reshape(-1)[:rows]


def sorted_keys(block: jax.Array, ranks: jax.Array, axis_name=None) -> jax.Array:
  """Exact key of rank ``ranks[:, r]`` (count limbs) of each row of
  ``block`` by sorting (the reference selector)."""
  flat = block.reshape(block.shape[0], -1)
  if axis_name is not None:
    flat = lax.all_gather(flat, axis_name, axis=1, tiled=True)
  flat = jnp.sort(flat, axis=1)
  # Rows of 2**31 entries or more cannot be indexed with int32: index
  # [high, low] in rows cut into pieces of 2**COUNT_LOW_BITS.
  flat = jnp.pad(flat, [(0, 0), (0, -flat.shape[1] % (_LOW_MASK + 1))])
  pieces = flat.reshape(flat.shape[0], -1, _LOW_MASK + 1)
  return pieces[jnp.arange(flat.shape[0]), ranks[0], ranks[1]]
