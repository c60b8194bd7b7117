"""Adaptive Instance Normalization (AdaIN): content normalized per instance, re-scaled with the style's statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit.functional._core import check_channels_first, check_eps, check_float
from normkit.stats import moments


def adain(content: Tensor, style: Tensor, eps: float = 1e-5, *, unbiased: bool = False, style_eps: bool = False) -> Tensor:
    """AdaIN: ``y = σ(style) · (content − μ(content)) / sqrt(σ²(content) + eps) + μ(style)``.

    Huang & Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization",
    ICCV 2017, arXiv:1703.06868. μ and σ² are per-(sample, channel) statistics over the spatial
    positions; ``style`` may have another spatial size than ``content`` (same N and C).

    Defaults follow the official Torch7 code (``xunhuang1995/AdaIN-style``,
    ``lib/AdaptiveInstanceNormalization.lua``): the content goes through a training-mode
    ``SpatialBatchNormalization`` on an ``(1, N·C, H, W)`` view — **biased** variance, eps (1e-5)
    inside the square root — and the style scale is ``style:std(3, true)``, the **biased** standard
    deviation **without** eps.

    Args:
        unbiased: use the Bessel-corrected (n − 1) variance for both inputs.
        style_eps: use ``sqrt(σ²(style) + eps)`` for the style scale.
            ``unbiased=True, style_eps=True`` reproduces the widely used PyTorch port
            (``naoto0804/pytorch-AdaIN``, ``calc_mean_std``), which differs slightly from the paper's code.

    Without ``style_eps`` the style std is ``sqrt(max(σ², tiny))`` (``tiny`` = the dtype's smallest
    normal number): identical in value up to ~1e-19, but a constant style channel (e.g. a dead ReLU
    feature) gets a finite gradient instead of ``0 · ∞ = NaN``. The official code has no backward
    through AdaIN at all (its decoder is trained behind a frozen encoder).
    """
    eps = check_eps(eps)
    c = check_channels_first(content, None, "adain")
    check_float(style, "style")
    if content.dim() < 3 or style.dim() != content.dim() or style.shape[0] != content.shape[0] or style.shape[1] != c:
        raise ValueError(
            f"adain expects content (N, C, *spatial) and style (N, C, *spatial') with the same N, C and number of "
            f"spatial dims; got content {tuple(content.shape)} and style {tuple(style.shape)}"
        )
    need = 2 if unbiased else 1
    for name, t in (("content", content), ("style", style)):
        if math.prod(t.shape[2:]) < need:
            raise ValueError(f"adain: {name} needs at least {need} spatial position(s) per channel, got shape {tuple(t.shape)}")
    dims_c = tuple(range(2, content.dim()))
    corr = 1 if unbiased else 0
    c_mean, c_var = moments(content, dims_c, correction=corr)
    s_mean, s_var = moments(style, dims_c, correction=corr)
    if style_eps:
        s_std = torch.sqrt(s_var + eps)
    else:
        s_std = torch.sqrt(s_var.clamp_min(torch.finfo(s_var.dtype).tiny))
    scale = s_std * torch.rsqrt(c_var + eps)
    y = (content.to(c_mean.dtype) - c_mean) * scale + s_mean.to(c_mean.dtype)
    return y.to(content.dtype)
