"""Layers around normalization: weight standardization, normalizer-free tools, initialisers."""

from normkit.layers.init import lecun_normal_
from normkit.layers.normalizer_free import (
    GAMMA,
    GammaAct,
    ScaledStdConv2d,
    SkipInit,
    compute_gamma,
    gamma_act,
    scaled_standardize_weight,
)
from normkit.layers.weight_standardization import WSConv2d, WSLinear, standardize_weight, weight_standardize_

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
