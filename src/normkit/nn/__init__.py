"""Normalization modules; importing this package registers them."""

from normkit.nn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm
from normkit.nn.layer_norm import LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d
from normkit.nn.pointwise import DyT, ScaleNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "DyT",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "RMSNorm2d",
    "ScaleNorm",
]
