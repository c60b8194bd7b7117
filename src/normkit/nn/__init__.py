"""Normalization modules; importing this package registers them."""

from normkit.nn.adain import AdaIN
from normkit.nn.batch_channel_norm import BatchChannelNorm, EstBN
from normkit.nn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm
from normkit.nn.batch_variants import BatchRenorm, GhostBatchNorm
from normkit.nn.crms_norm import CRMSNorm
from normkit.nn.evonorm import EvoNormB0, EvoNormS0
from normkit.nn.gdwct import GDWCT
from normkit.nn.ibn import IBN
from normkit.nn.layer_norm import LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d
from normkit.nn.layer_norm_scaling import LayerNormScaling, RMSNormScaling, apply_layernorm_scaling
from normkit.nn.loan import LOAN
from normkit.nn.patch_norm import DualPatchNorm
from normkit.nn.pointwise import DyT, ScaleNorm
from normkit.nn.power_norm import PowerNorm
from normkit.nn.region_norm import RegionNormB, RegionNormL
from normkit.nn.rep_batch_norm import PRepBN, RepBN, fuse_rep_batch_norm
from normkit.nn.response_norm import FilterResponseNorm, GlobalResponseNorm
from normkit.nn.unified_norm import UnifiedNorm

__all__ = [
    "AdaIN",
    "BatchChannelNorm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "CRMSNorm",
    "DualPatchNorm",
    "DyT",
    "EstBN",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GDWCT",
    "GhostBatchNorm",
    "GlobalResponseNorm",
    "GroupNorm",
    "IBN",
    "InstanceNorm",
    "LOAN",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNormScaling",
    "PRepBN",
    "PowerNorm",
    "RMSNorm",
    "RMSNorm2d",
    "RMSNormScaling",
    "RegionNormB",
    "RegionNormL",
    "RepBN",
    "ScaleNorm",
    "UnifiedNorm",
    "apply_layernorm_scaling",
    "fuse_rep_batch_norm",
]
