"""Moved to :mod:`normkit.nn` (weight standardization, normalizer-free layers) and :mod:`normkit.nn.init`.

Kept as a plain re-export so ``normkit.layers.X`` and its submodules keep working.
"""

from normkit.nn.init import lecun_normal_
from normkit.nn.normalizer_free import (
    GAMMA,
    GammaAct,
    ScaledStdConv2d,
    SkipInit,
    compute_gamma,
    gamma_act,
    scaled_standardize_weight,
)
from normkit.nn.weight_standardization import WSConv2d, WSLinear, standardize_weight, weight_standardize_

__all__ = [
    "GAMMA",
    "GammaAct",
    "ScaledStdConv2d",
    "SkipInit",
    "WSConv2d",
    "WSLinear",
    "compute_gamma",
    "gamma_act",
    "lecun_normal_",
    "scaled_standardize_weight",
    "standardize_weight",
    "weight_standardize_",
]
