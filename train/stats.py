"""Statistics of evaluations (numpy only): one run's exact-match interval, before/after gain
and the spread over seeds; the study's paired bootstrap over eval items and seeds.

A method's result is a [seeds, items] matrix of per-item scores (exact match 0/1), the
same items for every seed and method. One bootstrap sample draws seeds and items with
replacement, independently, and takes the mean over the drawn grid; the difference of two
methods resamples the per-item, per-seed difference with the same draw, so it stays paired
on item and seed. Every matrix of one study uses the same draws (one `Resampler`), so the
numbers do not depend on the order in which they are asked for.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

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


Z95 = 1.959964  # two-sided 95% normal quantile


def answer_stats(records: list[dict]) -> dict:
  """Exact-match accuracy with a 95% Wilson interval, the mean task score (partial credit),
  and the most common prediction with its share of all predictions (a collapse detector)."""
  n = len(records)
  if not n:
    return {"items": 0, "exact_matches": 0, "accuracy": float("nan")}
  hits = sum(int(r["exact"]) for r in records)
  p = hits / n
  centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
  half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
  top, top_count = Counter(r["prediction"] for r in records).most_common(1)[0]
  return {
    "items": n,
    "exact_matches": hits,
    "accuracy": p,
    "accuracy_ci95": [max(0.0, centre - half), min(1.0, centre + half)],
    "score": float(np.mean([r["score"] for r in records])),
    "top_answer": top,
    "top_answer_share": top_count / n,
  }


def paired_gain(before: list[dict], after: list[dict]) -> dict:
  """After minus before exact-match accuracy on the same items, with the 95% interval of the
  paired normal approximation (per-item differences in {-1, 0, 1})."""
  if len(before) != len(after) or not before:
    raise ValueError(f"paired_gain needs the same items: {len(before)} vs {len(after)}")
  diffs = np.array([int(a["exact"]) - int(b["exact"]) for b, a in zip(before, after)], float)
  n, gain = len(diffs), float(diffs.mean())
  half = Z95 * float(diffs.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
  return {
    "accuracy_gain": gain,
    "accuracy_gain_ci95": [gain - half, gain + half],
    "fixed": int((diffs > 0).sum()),
    "broken": int((diffs < 0).sum()),
  }


def seeds_interval(values: list[float]) -> tuple[float, float]:
  """Mean and the half-width of the 95% Student-t interval of per-seed values."""
  values = np.asarray(values, float)
  if len(values) < 2:
    return float(values.mean()), float("inf")
  t = _T975.get(len(values) - 1, Z95)
  return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(len(values)))


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
