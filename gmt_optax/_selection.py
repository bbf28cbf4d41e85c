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
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_KEY_DTYPES = {1: jnp.int8, 2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


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
  does); a traced ratio (schedules, ``inject_hyperparams``) is computed in
  float32.
  """
  if isinstance(ratio, (int, float)) and isinstance(n, (int, np.integer)):
    return min(max(int(np.floor(ratio * n)), 0), max(n - 1, 0))
  k = jnp.floor(jnp.asarray(ratio, jnp.float32) * jnp.asarray(n, jnp.float32))
  return jnp.clip(k, 0, jnp.maximum(jnp.asarray(n, jnp.float32) - 1, 0))


def sample_entries(x: jax.Array, num_samples: int, rng: jax.Array) -> jax.Array:
  """``num_samples`` entries of ``x`` drawn uniformly with replacement.

  One independent index vector per dimension: a uniform draw over the
  entries, and a gather the SPMD partitioner keeps local (``ravel`` of a
  sharded array would all-gather it).
  """
  if x.ndim == 0:
    return jnp.broadcast_to(x, (num_samples,))
  rngs = jax.random.split(rng, x.ndim)
  index = tuple(
      jax.random.randint(r, (num_samples,), 0, d, dtype=jnp.int32)
      for r, d in zip(rngs, x.shape)
  )
  return x[index]


@dataclasses.dataclass(frozen=True)
class CountingProblem:
  """Batched bisection: find, per group, the smallest key ``t`` with
  ``sum_l weight_l * count(keys_l <= t) >= target``.

  Attributes:
    keys: one integer key array per tensor (full tensor or a sample of it).
    group: for each key array, the index of its threshold.
    weights: per key array, the weight of one counted entry (``None`` means
      all ones and exact int32 counting).
    targets: ``[num_groups]`` count each group must reach (``k + 1``).
  """

  keys: Sequence[jax.Array]
  group: Sequence[int]
  weights: Optional[Sequence[float]]
  targets: jax.Array


def bisect(problem: CountingProblem, axis_name=None) -> jax.Array:
  """Solves a :class:`CountingProblem`; returns ``[num_groups]`` int keys.

  ``axis_name``: counts are ``psum``-med over it (one vector all-reduce per
  step), so local shards agree on the threshold of the whole tensor.
  """
  num_groups = problem.targets.shape[0]
  group_bits = np.zeros(num_groups, np.int64)
  for k, g in zip(problem.keys, problem.group):
    group_bits[g] = max(group_bits[g], key_bits(k.dtype))
  steps = int(group_bits.max())
  carry_dtype = jnp.int64 if steps > 31 else jnp.int32
  lo = jnp.zeros(num_groups, carry_dtype)
  hi = jnp.asarray((1 << group_bits) - 1, carry_dtype)
  count_dtype = jnp.int32 if problem.weights is None else jnp.float32
  targets = problem.targets.astype(count_dtype)
  group_ids = np.asarray(problem.group, np.int32)
  weights = (None if problem.weights is None
             else jnp.asarray(problem.weights, jnp.float32))

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    counts = jnp.stack([
        jnp.sum(k <= mid[g].astype(k.dtype), dtype=jnp.int32)
        for k, g in zip(problem.keys, problem.group)
    ])
    if axis_name is not None:
      counts = lax.psum(counts, axis_name)
    if weights is not None:
      counts = counts.astype(jnp.float32) * weights
    group_counts = jax.ops.segment_sum(counts, group_ids, num_groups)
    enough = group_counts >= targets
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = lax.fori_loop(0, steps, step, (lo, hi))
  return lo


def sorted_key(keys: jax.Array, k, axis_name=None) -> jax.Array:
  """Exact key of rank ``k`` by sorting (the reference selector)."""
  flat = keys.reshape(-1)
  if axis_name is not None:
    flat = lax.all_gather(flat, axis_name, tiled=True)
  return jnp.sort(flat)[jnp.asarray(k, jnp.int32)]
