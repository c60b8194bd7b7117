"""normkit — normalization layers and the techniques around them, for PyTorch.

Quick use::

    import normkit
    norm = normkit.create_norm("rmsnorm", 1024)          # any registered method by name
    y = normkit.functional.layer_norm(x, 1024)           # functional API
    with normkit.set_backend("compiled"):                # fused torch.compile kernels
        y = norm(x)
"""

from normkit import adapt, continual, functional, layers, models, stats
from normkit.backend import BACKENDS, get_backend, set_backend
from normkit.layers import ScaledStdConv2d, SkipInit, WSConv2d, WSLinear, lecun_normal_, weight_standardize_
from normkit.models import self_normalizing_mlp
from normkit.nn import (
    GDWCT,
    IBN,
    LOAN,
    AdaIN,
    BatchChannelNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    CRMSNorm,
    DualPatchNorm,
    DyT,
    EstBN,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GhostBatchNorm,
    GlobalResponseNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    LayerNormScaling,
    PowerNorm,
    PRepBN,
    RegionNormB,
    RegionNormL,
    RepBN,
    RMSNorm,
    RMSNorm2d,
    RMSNormScaling,
    ScaleNorm,
    UnifiedNorm,
    apply_layernorm_scaling,
    fuse_rep_batch_norm,
)
from normkit.registry import NormInfo, Paper, create_norm, list_norms, norm_info, register_norm, sample_norm

__version__ = "0.1.0"

__all__ = [
    "AdaIN",
    "BACKENDS",
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
    "NormInfo",
    "PRepBN",
    "Paper",
    "PowerNorm",
    "RMSNorm",
    "RMSNorm2d",
    "RMSNormScaling",
    "RegionNormB",
    "RegionNormL",
    "RepBN",
    "ScaleNorm",
    "ScaledStdConv2d",
    "SkipInit",
    "UnifiedNorm",
    "WSConv2d",
    "WSLinear",
    "apply_layernorm_scaling",
    "adapt",
    "continual",
    "create_norm",
    "functional",
    "fuse_rep_batch_norm",
    "get_backend",
    "layers",
    "lecun_normal_",
    "list_norms",
    "models",
    "norm_info",
    "register_norm",
    "sample_norm",
    "self_normalizing_mlp",
    "set_backend",
    "stats",
    "weight_standardize_",
]
