"""Functional normalization API (stateless; modules in :mod:`normkit.nn` are thin shells over it)."""

from normkit.functional.batch_norm import batch_norm, group_norm, instance_norm
from normkit.functional.layer_norm import add_norm, layer_norm, layer_norm2d, rms_norm, rms_norm2d
from normkit.functional.pointwise import dyt, scale_norm

__all__ = [
    "add_norm",
    "batch_norm",
    "dyt",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "rms_norm",
    "rms_norm2d",
    "scale_norm",
]
