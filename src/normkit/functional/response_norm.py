"""Response norms: Filter Response Normalization (+TLU) and Global Response Normalization.

Both are per-sample, batch-independent and identical in train and eval.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional._core import channel_view, check_channels_first, check_eps, check_float, check_param, trailing_numel
from normkit.stats import accumulation_dtype, mean_square


def _frn_math(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    learned_eps: Tensor | None,
    eps: float,
    stats_dtype: torch.dtype | None,
) -> Tensor:
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xf = x.to(sd)
    flat = xf.reshape(x.shape[0], x.shape[1], trailing_numel(x))
    nu2 = mean_square(flat, 2).reshape((x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2))
    e = eps if learned_eps is None else eps + learned_eps.to(sd).abs().reshape(())
    y = xf * torch.rsqrt(nu2 + e)
    if weight is not None:
        y = y * channel_view(weight, x).to(sd)
    if bias is not None:
        y = y + channel_view(bias, x).to(sd)
    if tau is not None:
        y = torch.maximum(y, channel_view(tau, x).to(sd))
    return y.to(x.dtype)


def filter_response_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    tau: Tensor | None = None,
    eps: float = 1e-6,
    *,
    learned_eps: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Filter Response Normalization with the Thresholded Linear Unit, over ``(N, C, *)`` input.

    Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence in the
    Training of Deep Neural Networks", 2019 (CVPR 2020), arXiv:1911.09737::

        ν² = mean_{*}(x²)                          per sample and channel, over the spatial dims
        y  = γ · x / sqrt(ν² + ε) + β
        z  = max(y, τ)                             TLU; skipped when ``tau`` is None

    ``ε = eps`` (paper default 1e-6), or ``eps + |learned_eps|`` when a learned scalar is given
    (the paper's ``tf.abs(eps)`` for a learnable ε, with the constant as a floor as in
    TF-Addons' ``learned_epsilon``). (N, C) input is treated as 1×1 maps, ν² = x² — the case
    the paper recommends a learned ε for.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "filter_response_norm")
    check_param(weight, c, "weight", "filter_response_norm")
    check_param(bias, c, "bias", "filter_response_norm")
    check_param(tau, c, "tau", "filter_response_norm")
    if learned_eps is not None and learned_eps.numel() != 1:
        raise ValueError(f"filter_response_norm: learned_eps must be a single value, got shape {tuple(learned_eps.shape)}")
    impl = _backend.resolve(backend, x, "frn")
    key = (eps, stats_dtype, x.dtype, weight is not None, bias is not None, tau is not None, learned_eps is not None)
    return _backend.executor(impl, _frn_math, key)(x, weight, bias, tau, learned_eps, eps, stats_dtype)


def _grn_math(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channels_last: bool,
    stats_dtype: torch.dtype | None,
) -> Tensor:
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xf = x.to(sd)
    spatial = tuple(range(1, x.dim() - 1)) if channels_last else tuple(range(2, x.dim()))
    gx = torch.linalg.vector_norm(xf, 2, dim=spatial, keepdim=True)
    nx = gx / (gx.mean(-1 if channels_last else 1, keepdim=True) + eps)
    y = xf * nx
    if weight is not None:
        y = y * channel_view(weight, x, channels_last).to(sd)
    if bias is not None:
        y = y + channel_view(bias, x, channels_last).to(sd)
    return (y + xf).to(x.dtype)


def global_response_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    channels_last: bool = False,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Global Response Normalization (ConvNeXt V2).

    Woo, Debnath, Hu, Chen, Liu, Kweon & Xie, "ConvNeXt V2: Co-designing and Scaling ConvNets
    with Masked Autoencoders", 2023, arXiv:2301.00808::

        G(x) = ‖x‖₂ over the spatial dims          per sample and channel
        N(x) = G(x) / (mean_C G(x) + eps)          divisive normalization across channels
        y    = γ · (x · N(x)) + β + x              residual: identity at γ = β = 0

    Input ``(N, C, *spatial)``; ``channels_last=True`` takes the official ``(N, *spatial, C)``
    layout. eps is 1e-6 and added outside the mean, as in the official code. ``weight``/``bias``
    of None mean γ = 1 / β = 0.
    """
    eps = check_eps(eps)
    check_float(x)
    if x.dim() < 3:
        layout = "(N, *spatial, C)" if channels_last else "(N, C, *spatial)"
        raise ValueError(f"global_response_norm expects {layout} input with at least one spatial dim, got shape {tuple(x.shape)}")
    c = x.shape[-1] if channels_last else x.shape[1]
    check_param(weight, c, "weight", "global_response_norm")
    check_param(bias, c, "bias", "global_response_norm")
    impl = _backend.resolve(backend, x, "grn")
    key = (eps, bool(channels_last), stats_dtype, x.dtype, weight is not None, bias is not None)
    return _backend.executor(impl, _grn_math, key)(x, weight, bias, eps, bool(channels_last), stats_dtype)
