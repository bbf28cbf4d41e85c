"""Paired bootstrap over eval items and seeds: the study's intervals and p-values (numpy only).

A method's result is a [seeds, items] matrix of per-item scores (exact match 0/1), the
same items for every seed and method. One bootstrap sample draws seeds and items with
replacement, independently, and takes the mean over the drawn grid; the difference of two
methods resamples the per-item, per-seed difference with the same draw, so it stays paired
on item and seed. Every matrix of one study uses the same draws (one `Resampler`), so the
numbers do not depend on the order in which they are asked for.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean with its 95% percentile interval and the two-sided bootstrap p-value of mean = 0."""

  mean: float
  low: float
  high: float
  p_value: float


class Resampler:
  """Bootstrap weights for `num_seeds` x `num_items` matrices, drawn once from `seed`.

  Args:
    num_seeds: rows of every matrix.
    num_items: columns of every matrix.
    samples: bootstrap samples B.
    seed: the numpy seed of the draws (fixed, so intervals repeat exactly).
  """

  def __init__(self, num_seeds: int, num_items: int, samples: int = 10_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    # How often each seed and item is drawn in each sample: [B, S] and [B, N] counts.
    self.seed_weights = rng.multinomial(num_seeds, np.full(num_seeds, 1 / num_seeds), samples)
    self.item_weights = rng.multinomial(num_items, np.full(num_items, 1 / num_items), samples)
    self.shape = (num_seeds, num_items)

  def means(self, values: np.ndarray) -> np.ndarray:
    """The B bootstrap means of a [seeds, items] matrix."""
    values = np.asarray(values, np.float64)
    if values.shape != self.shape:
      raise ValueError(f"expected a {self.shape} matrix, got {values.shape}")
    per_seed = self.item_weights @ values.T / self.shape[1]  # [B, S]: each seed's item mean
    return (self.seed_weights * per_seed).sum(axis=1) / self.shape[0]

  def estimate(self, values: np.ndarray) -> Estimate:
    """Mean, 95% percentile interval and two-sided p-value (mean = 0) of a matrix.

    The p-value shifts the bootstrap distribution to mean 0 (the null) and counts the
    samples at least as far from 0 as the observed mean: (count + 1) / (B + 1).
    """
    observed = float(np.mean(values))
    means = self.means(values)
    low, high = np.percentile(means, [2.5, 97.5])
    extreme = np.sum(np.abs(means - observed) >= abs(observed))
    return Estimate(observed, float(low), float(high), float((extreme + 1) / (len(means) + 1)))


def variance_components(differences: np.ndarray) -> tuple[float, float]:
  """(within-seed item variance, between-seed variance) of a [seeds, items] matrix.

  The variance of its grand mean is about item / (S * N) + seed / S: what sizes a study.
  The seed component is the variance of the seed means less their item noise (>= 0).
  """
  differences = np.asarray(differences, np.float64)
  num_seeds, num_items = differences.shape
  item = float(differences.var(axis=1, ddof=1).mean()) if num_items > 1 else 0.0
  seed_means = differences.mean(axis=1)
  seed = float(seed_means.var(ddof=1)) - item / num_items if num_seeds > 1 else 0.0
  return item, max(seed, 0.0)


def resolvable_difference(item: float, seed: float, num_seeds: int, num_items: int) -> float:
  """Half-width of the 95% interval of a mean difference with these variance components."""
  return 1.96 * float(np.sqrt(item / (num_seeds * num_items) + seed / num_seeds))


def items_needed(item: float, seed: float, num_seeds: int, half_width: float) -> float:
  """Items per seed for a 95% half-width of `half_width` (inf: seeds alone exceed it)."""
  room = (half_width / 1.96) ** 2 - seed / num_seeds
  return float("inf") if room <= 0 else item / (num_seeds * room)
