"""Fused normalization kernels behind the backend dispatch (:mod:`normkit.backend`).

:mod:`normkit.kernels.canonical` (the canonical statistics kernel, exported as ``normalize``),
:mod:`normkit.kernels.pointwise` (ScaleNorm, DyT), :mod:`normkit.kernels.cpu` (normkit's C++ CPU
kernels) and :mod:`normkit.kernels.ops` (those kernels as ``torch.ops.normkit.*`` operators).
"""

from normkit.kernels import cpu, ops
from normkit.kernels.canonical import normalize

__all__ = ["cpu", "normalize", "ops"]
