"""Optimizers and tools for scale-invariant (normalized) weights.

A weight that feeds a normalization layer is scale-invariant: the loss does not change when it
is multiplied by a positive constant, so its gradient is orthogonal to it and plain updates grow
its norm, which shrinks the effective step. The optimizers here act on that: AdamP/SGDP project
the radial component out, LAMB/LARS/NovoGrad scale steps layer-wise, SinkGD normalizes whole
gradient matrices, AGC clips gradients relative to the weights' norms.
"""

from __future__ import annotations

from normkit.optim.adamp import AdamP
from normkit.optim.scale_invariant import find_scale_invariant, scale_invariant_groups, scale_invariant_params
from normkit.optim.sgdp import SGDP

__all__ = [
    "AdamP",
    "SGDP",
    "find_scale_invariant",
    "scale_invariant_groups",
    "scale_invariant_params",
]
