"""normkit — normalization layers and the techniques around them, for PyTorch.

Quick use::

    import normkit
    norm = normkit.create_norm("rmsnorm", 1024)          # any registered method by name
    y = normkit.functional.layer_norm(x, 1024)           # functional API
    with normkit.set_backend("compiled"):                # fused torch.compile kernels
        y = norm(x)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from normkit import functional, stats
from normkit.backend import BACKENDS, get_backend, set_backend
from normkit.nn import (
    GDWCT,
    IBN,
    LOAN,
    AdaB2N,
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
    ScaledStdConv2d,
    ScaleNorm,
    ScaleNorm2d,
    SkipInit,
    UnifiedNorm,
    WSConv2d,
    WSLinear,
    apply_layernorm_scaling,
    fuse_rep_batch_norm,
    weight_standardize_,
)
from normkit.nn.init import lecun_normal_
from normkit.registry import NormInfo, Paper, create_norm, list_norms, norm_info, register_norm, sample_norm

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these load on first attribute access
    from normkit import adapt, bench, continual, convert, layers, models  # noqa: F401  (bench: not in __all__)
    from normkit.models import self_normalizing_mlp

__version__ = "0.1.0"

#: Subpackages loaded on first access (PEP 562), not by ``import normkit``: they sit above the
#: modules (models, test-time adaptation, continual learning, model conversion, the bench with its data and suites)
#: and most users of a normalization layer never touch them. ``normkit.layers`` is the old home
#: of ``normkit.nn``'s weight-standardized / normalizer-free layers, kept as a re-export.
_LAZY_SUBMODULES = ("adapt", "bench", "continual", "convert", "distributed", "layers", "models", "optim")
#: Top-level names that live in a lazily loaded subpackage: name → the module that defines it.
_LAZY_ATTRS = {"self_normalizing_mlp": "normkit.models"}


def __getattr__(name: str) -> Any:
    """Load a heavy subpackage (or a name from one) on first access, so ``import normkit`` stays light."""
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _LAZY_ATTRS:
        value = getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_LAZY_ATTRS))


__all__ = [
    "AdaB2N",
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
    "ScaleNorm2d",
    "ScaledStdConv2d",
    "SkipInit",
    "UnifiedNorm",
    "WSConv2d",
    "WSLinear",
    "apply_layernorm_scaling",
    "adapt",
    "continual",
    "convert",
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
