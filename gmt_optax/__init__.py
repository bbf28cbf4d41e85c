"""gmt-optax: Gradient-Mask Tuning (arXiv 2406.15330) as optax transformations.

>>> import optax, gmt_optax
>>> tx = optax.chain(gmt_optax.gradient_mask(mask_ratio=0.4), optax.adamw(1e-5))
"""

from gmt_optax._accumulation import AccumulationState
from gmt_optax._accumulation import MaskedUpdateState
from gmt_optax._accumulation import accumulate_gradients
from gmt_optax._accumulation import gmt
from gmt_optax._hft import HFTState
from gmt_optax._hft import hft
from gmt_optax._masking import GradientMaskState
from gmt_optax._masking import RandomMaskState
from gmt_optax._masking import gradient_mask
from gmt_optax._masking import kept_fraction
from gmt_optax._masking import random_mask

__version__ = "0.1.0"

__all__ = (
    "AccumulationState",
    "GradientMaskState",
    "HFTState",
    "MaskedUpdateState",
    "RandomMaskState",
    "accumulate_gradients",
    "gmt",
    "gradient_mask",
    "hft",
    "kept_fraction",
    "random_mask",
)
