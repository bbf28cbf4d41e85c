"""Ahead-of-time plans: a recipe's train step compiled for a TPU slice (or local devices) without
weights, its memory per chip, its cost per step and its modeled step time.

| module | holds |
| --- | --- |
| `train/plan/recipe.py` | `python -m train.plan`: a recipe compiled, its memory, work and sweep |
| `train/plan/hlo.py` | the compiled HLO read as a program: loop trips, FLOPs, bytes, collectives |
| `train/plan/roofline.py` | `step_model`: the modeled step time |
| `train/plan/chips.py` | each TPU generation's constants, with their sources |
"""

from train.plan.chips import CHIPS, HBM_BYTES, Chip, chip_of
from train.plan.hlo import COLLECTIVES, collectives
from train.plan.recipe import (
  SWEEP_HEADROOM,
  main,
  model_config_of,
  plan,
  remat_sweep,
  slice_links,
  topology_devices,
)
from train.plan.roofline import fit_matmul_efficiency, step_model

__all__ = [
  "CHIPS",
  "COLLECTIVES",
  "HBM_BYTES",
  "SWEEP_HEADROOM",
  "Chip",
  "chip_of",
  "collectives",
  "fit_matmul_efficiency",
  "main",
  "model_config_of",
  "plan",
  "remat_sweep",
  "slice_links",
  "step_model",
  "topology_devices",
]
