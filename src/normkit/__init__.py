"""normkit — normalization layers and the techniques around them, for PyTorch.

Quick use::

    import normkit
    norm = normkit.create_norm("rmsnorm", 1024)          # any registered method by name
    y = normkit.functional.layer_norm(x, 1024)           # functional API
    with normkit.set_backend("compiled"):                # fused torch.compile kernels
        y = norm(x)
"""

from normkit import functional, stats
from normkit.backend import BACKENDS, get_backend, set_backend
from normkit.nn import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    DyT,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    RMSNorm2d,
    ScaleNorm,
)
from normkit.registry import NormInfo, Paper, create_norm, list_norms, norm_info, register_norm

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "DyT",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNorm2d",
    "NormInfo",
    "Paper",
    "RMSNorm",
    "RMSNorm2d",
    "ScaleNorm",
    "create_norm",
    "functional",
    "get_backend",
    "list_norms",
    "norm_info",
    "register_norm",
    "set_backend",
    "stats",
]
