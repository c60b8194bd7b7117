"""Moved to :mod:`normkit.nn.normalizer_free`; re-exported here so old imports keep working."""

from normkit.nn.normalizer_free import (
    ACTIVATIONS,
    GAMMA,
    NF_RESNET_PAPER,
    NFNET_PAPER,
    SKIPINIT_PAPER,
    GammaAct,
    ScaledStdConv2d,
    SkipInit,
    compute_gamma,
    gamma_act,
    scaled_standardize_weight,
)

__all__ = [
    "ACTIVATIONS",
    "GAMMA",
    "NFNET_PAPER",
    "NF_RESNET_PAPER",
    "SKIPINIT_PAPER",
    "GammaAct",
    "ScaledStdConv2d",
    "SkipInit",
    "compute_gamma",
    "gamma_act",
    "scaled_standardize_weight",
]
