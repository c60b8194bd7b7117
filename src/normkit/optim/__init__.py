"""Optimizers and tools for scale-invariant (normalized) weights.

A weight that feeds a normalization layer is scale-invariant: the loss does not change when it
is multiplied by a positive constant, so its gradient is orthogonal to it and plain updates grow
its norm, which shrinks the effective step. The optimizers here act on that: AdamP/SGDP project
the radial component out, LAMB/LARS/NovoGrad scale steps layer-wise, SinkGD normalizes whole
gradient matrices, AGC clips gradients relative to the weights' norms.
"""

from __future__ import annotations

from normkit.optim.adamp import AdamP
from normkit.optim.agc import AGC, adaptive_clip_grad_, nfnet_param_groups, unitwise_norm
from normkit.optim.groups import bias_and_norm_groups, is_bias_or_norm
from normkit.optim.lamb import LAMB
from normkit.optim.lars import LARS
from normkit.optim.novograd import NovoGrad
from normkit.optim.scale_invariant import find_scale_invariant, scale_invariant_groups, scale_invariant_params
from normkit.optim.sgdp import SGDP
from normkit.optim.sinkgd import SinkGD, sinkgd_param_groups, sinkhorn_normalize

__all__ = [
    "AGC",
    "AdamP",
    "LAMB",
    "LARS",
    "NovoGrad",
    "SGDP",
    "SinkGD",
    "adaptive_clip_grad_",
    "bias_and_norm_groups",
    "find_scale_invariant",
    "is_bias_or_norm",
    "nfnet_param_groups",
    "scale_invariant_groups",
    "scale_invariant_params",
    "sinkgd_param_groups",
    "sinkhorn_normalize",
    "unitwise_norm",
]
