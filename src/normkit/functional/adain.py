"""Adaptive Instance Normalization (AdaIN): content normalized per instance, re-scaled with the style's statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit.backend import resolve
from normkit.functional._core import check_channels_first, check_eps, check_float, normalize_view
from normkit.kernels.canonical import safe_rstd
from normkit.stats import accumulation_dtype, moments


def adain(
    content: Tensor,
    style: Tensor,
    eps: float = 1e-5,
    *,
    unbiased: bool = False,
    style_eps: bool = False,
    backend: str | None = None,
) -> Tensor:
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

    Implementation: the content's normalization is the statistics engine's kernel
    (:func:`normkit.functional._core.normalize_view`) on the ``(1, N·C, 1, H·W)`` view with the style's
    std/mean as per-segment weight/bias, so ``backend`` picks its implementation as for InstanceNorm
    (``"auto"``: normkit's C++ kernels on CPU, saving only the content for backward). Values far from 1
    (|x| ~ 1e30 or 1e-30 in float32) give the float64 answer: the kernel's and the style's rstd are
    recomputed from a power-of-two–scaled input where the variance overflowed
    (:func:`normkit.kernels.canonical.safe_rstd`).
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
    n, length_c, length_s = content.shape[0], math.prod(content.shape[2:]), math.prod(style.shape[2:])
    # biased moments everywhere; the unbiased (n − 1) convention is a factor k = L/(L − 1) on the
    # variance, folded into eps and the weight: 1/sqrt(k·σ² + eps) = k^−½ / sqrt(σ² + eps/k)
    k_c = length_c / (length_c - 1) if unbiased else 1.0
    k_s = length_s / (length_s - 1) if unbiased else 1.0
    s_std, s_mean = _style_std_mean(style, eps if style_eps else None, k_s, backend)
    weight = s_std if k_c == 1.0 else s_std * k_c**-0.5
    sd = accumulation_dtype(content.dtype)
    # the content's instance norm is the engine's kernel on the official (1, N·C, H·W) view: one
    # segment per (sample, channel), the style's std and mean as that segment's weight and bias
    # (one forward pass, closed-form backward that saves only the content and O(N·C) statistics)
    x4 = content.reshape(1, n * c, 1, length_c)
    w, b = weight.reshape(n * c), s_mean.reshape(n * c)
    if w.dtype != content.dtype and content.dtype == sd:
        w, b = w.to(sd), b.to(sd)
    y = normalize_view(x4, w, b, (2, 3), center=True, eps=eps / k_c, backend=backend)[0]
    return y.reshape(content.shape)


def _style_std_mean(style: Tensor, eps: float | None, k: float, backend: str | None) -> tuple[Tensor, Tensor]:
    """The style's per-(sample, channel) std ``sqrt(k·σ² (+ eps))`` and mean, right for any finite input.

    ``σ²`` is the biased variance (``k`` = L/(L − 1) makes it unbiased). Without eps it is clamped at the
    dtype's smallest normal number (a constant channel gets a finite gradient). The std is
    ``sqrt(k) / safe_rstd(...)``: where σ² overflowed (|style| ≳ 1e19 in float32) the engine's
    rescue recomputes it from the power-of-two–scaled input, so a style at 1e30 gives its std, not inf.

    A style that needs no gradient (the official setting: features of a frozen encoder) takes its
    moments from the engine's C++ kernel where that is what ``backend`` runs (one pass per row,
    18 ms vs 93 ms for ``torch.var_mean`` at 32×64×57×57 on 2 cores; the normalized output it also
    writes is dropped); otherwise ``torch.var_mean``, differentiable.
    """
    dims = tuple(range(2, style.dim()))
    n, c = style.shape[:2]
    s4 = style.reshape(1, n * c, 1, math.prod(style.shape[2:]))
    if (not (style.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()
            and resolve(backend, s4, "normalize") == "kernels"):
        with torch.no_grad():
            _, mean, var = normalize_view(s4, None, None, (2, 3), center=True, eps=1.0, backend="kernels")
        mean, var = mean.reshape(n, c, *(1,) * len(dims)), var.reshape(n, c, *(1,) * len(dims))
    else:
        mean, var = moments(style, dims)
    if eps is None:
        var, eps = var.clamp_min(torch.finfo(var.dtype).tiny), 0.0
    std = safe_rstd(style, dims, var, eps / k, mean=mean).reciprocal()
    return (std if k == 1.0 else std * math.sqrt(k)), mean
