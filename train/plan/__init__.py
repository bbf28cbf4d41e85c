"""Ahead-of-time plans: a recipe's train step compiled for a TPU slice (or local devices) without
weights, its memory per chip, its cost per step and its modeled step time.

`python -m train.plan` is the command line (`train/plan/recipe.py`).
"""

from train.plan.recipe import (
  COLLECTIVES,
  HBM_BYTES,
  SWEEP_HEADROOM,
  collectives,
  main,
  model_config_of,
  plan,
  remat_sweep,
  slice_links,
  topology_devices,
)

__all__ = [
  "COLLECTIVES",
  "HBM_BYTES",
  "SWEEP_HEADROOM",
  "collectives",
  "main",
  "model_config_of",
  "plan",
  "remat_sweep",
  "slice_links",
  "topology_devices",
]
