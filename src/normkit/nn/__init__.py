"""Normalization modules and the layers around them; importing this package registers every method.

Every registered layer lives here (AdaB²N included), next to the weight-standardized and
normalizer-free layers and the initialisers in :mod:`normkit.nn.init`, so ``import normkit``
(which imports this package) is enough to see the whole registry.
"""

from normkit.nn import init
from normkit.nn.adab2n import AdaB2N, convert_adab2n
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
from normkit.nn.normalizer_free import GammaAct, ScaledStdConv2d, SkipInit
from normkit.nn.patch_norm import DualPatchNorm
from normkit.nn.pointwise import DyT, ScaleNorm, ScaleNorm2d
from normkit.nn.power_norm import PowerNorm
from normkit.nn.region_norm import RegionNormB, RegionNormL
from normkit.nn.rep_batch_norm import PRepBN, RepBN, fuse_rep_batch_norm
from normkit.nn.response_norm import FilterResponseNorm, GlobalResponseNorm
from normkit.nn.unified_norm import UnifiedNorm
from normkit.nn.weight_standardization import WSConv2d, WSLinear, weight_standardize_

__all__ = [
    "AdaB2N",
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
    "GammaAct",
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
    "ScaleNorm2d",
    "ScaledStdConv2d",
    "SkipInit",
    "UnifiedNorm",
    "WSConv2d",
    "WSLinear",
    "apply_layernorm_scaling",
    "convert_adab2n",
    "fuse_rep_batch_norm",
    "init",
    "weight_standardize_",
]
