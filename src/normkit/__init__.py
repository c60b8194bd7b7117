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

from normkit import functional, nn, stats
from normkit.backend import BACKENDS, get_backend, set_backend
from normkit.nn import *  # noqa: F403 - every layer at the top level too (normkit.LayerNorm is normkit.nn.LayerNorm)
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


__all__ = [  # the layers (normkit.nn.__all__), then what the top level adds
    *nn.__all__,
    "BACKENDS",
    "NormInfo",
    "Paper",
    "adapt",
    "continual",
    "convert",
    "create_norm",
    "functional",
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
]
