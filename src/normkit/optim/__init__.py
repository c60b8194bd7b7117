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
from normkit.optim.diagnostics import NormDiagnostics, angular_update, effective_lr, grad_norms_by_layer, plot_diagnostics
from normkit.optim.groups import bias_and_norm_groups, is_bias_or_norm
from normkit.optim.lamb import LAMB
from normkit.optim.lars import LARS
from normkit.optim.nap import NaP, nap_targets, normalize_and_project
from normkit.optim.novograd import NovoGrad
from normkit.optim.scale_invariant import find_scale_invariant, scale_invariant_groups, scale_invariant_params
from normkit.optim.scaling import top_singular_values, width_scaled_param_groups, width_scaling
from normkit.optim.sgdp import SGDP
from normkit.optim.sinkgd import SinkGD, sinkgd_param_groups, sinkhorn_normalize

__all__ = [
    "AGC",
    "AdamP",
    "LAMB",
    "LARS",
    "NaP",
    "NormDiagnostics",
    "NovoGrad",
    "SGDP",
    "SinkGD",
    "adaptive_clip_grad_",
    "angular_update",
    "bias_and_norm_groups",
    "effective_lr",
    "find_scale_invariant",
    "grad_norms_by_layer",
    "is_bias_or_norm",
    "nap_targets",
    "nfnet_param_groups",
    "normalize_and_project",
    "plot_diagnostics",
    "scale_invariant_groups",
    "scale_invariant_params",
    "sinkgd_param_groups",
    "sinkhorn_normalize",
    "top_singular_values",
    "unitwise_norm",
    "width_scaled_param_groups",
    "width_scaling",
]
