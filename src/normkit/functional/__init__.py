"""Functional normalization API (stateless; modules in :mod:`normkit.nn` are thin shells over it)."""

from normkit.functional.adain import adain
from normkit.functional.batch_channel_norm import batch_channel_norm, channel_norm, estimated_batch_norm
from normkit.functional.batch_norm import batch_norm, group_norm, instance_norm
from normkit.functional.batch_variants import batch_renorm, batch_renorm_limits, ghost_batch_norm
from normkit.functional.crms_norm import (
    center_writer,
    compress_reader,
    compress_writer,
    compress_zero_mean,
    crms_norm,
    decompress,
    fold_ln_affine,
)
from normkit.functional.evonorm import evonorm_b0, evonorm_s0
from normkit.functional.gdwct import coloring_matrix, coloring_regularizer, gdwct, group_whitening, whitening_regularizer
from normkit.functional.layer_norm import add_norm, layer_norm, layer_norm2d, rms_norm, rms_norm2d
from normkit.functional.loan import loan
from normkit.functional.normalize import normalize
from normkit.functional.pointwise import dyt, scale_norm
from normkit.functional.power_norm import group_scaling, power_norm
from normkit.functional.region_norm import region_norm_b, region_norm_l, region_normalize
from normkit.functional.rep_batch_norm import rep_batch_norm
from normkit.functional.response_norm import filter_response_norm, global_response_norm
from normkit.functional.unified_norm import unified_norm

__all__ = [
    "adain",
    "add_norm",
    "batch_channel_norm",
    "batch_norm",
    "batch_renorm",
    "batch_renorm_limits",
    "center_writer",
    "channel_norm",
    "coloring_matrix",
    "coloring_regularizer",
    "compress_reader",
    "compress_writer",
    "compress_zero_mean",
    "crms_norm",
    "decompress",
    "dyt",
    "estimated_batch_norm",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "fold_ln_affine",
    "gdwct",
    "ghost_batch_norm",
    "global_response_norm",
    "group_norm",
    "group_scaling",
    "group_whitening",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "loan",
    "normalize",
    "power_norm",
    "region_norm_b",
    "region_norm_l",
    "region_normalize",
    "rep_batch_norm",
    "rms_norm",
    "rms_norm2d",
    "scale_norm",
    "unified_norm",
    "whitening_regularizer",
]
