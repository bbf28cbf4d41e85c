"""gmt-optax: Gradient-Mask Tuning (arXiv 2406.15330) as optax transformations.

>>> import optax, gmt_optax
>>> tx = optax.chain(gmt_optax.gradient_mask(mask_ratio=0.4), optax.adamw(1e-5))
"""

from gmt_optax._accumulation import AccumulationState, MaskedUpdateState, accumulate_gradients, gmt
from gmt_optax._hft import HFTState, hft
from gmt_optax._masking import (
  GradientMaskState,
  RandomMaskState,
  gradient_mask,
  kept_fraction,
  random_mask,
)
from gmt_optax._telemetry import GradientMaskTelemetryState, MaskTelemetry, mask_telemetry

__version__ = "0.1.0"

__all__ = (
  "AccumulationState",
  "GradientMaskState",
  "GradientMaskTelemetryState",
  "HFTState",
  "MaskTelemetry",
  "MaskedUpdateState",
  "RandomMaskState",
  "accumulate_gradients",
  "gmt",
  "gradient_mask",
  "hft",
  "kept_fraction",
  "mask_telemetry",
  "random_mask",
)
