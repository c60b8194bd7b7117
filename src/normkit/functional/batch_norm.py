"""Batch-statistics norms over channels-first ``(N, C, *)`` input: BatchNorm, InstanceNorm, GroupNorm."""

from __future__ import annotations

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional import aten as _aten
from normkit.functional._core import (
    canonical_mask,
    check_channels_first,
    check_eps,
    check_param,
    normalize_view,
    trailing_numel,
)
from normkit.stats import Reducer


def channel_affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Normalize with fixed per-channel statistics (eval mode) as one per-channel affine map."""
    c = x.shape[1]
    scale = torch.rsqrt(var.to(torch.promote_types(var.dtype, torch.float32)) + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))


def _tracked(*stats: Tensor | None) -> bool:
    """Whether any of these running statistics requires grad (autograd must see them)."""
    return any(t is not None and t.requires_grad for t in stats)


@torch.no_grad()
def _update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor | float, momentum: float
) -> None:
    """torch's convention: ``r ← (1 − m)·r + m·batch``, with the *unbiased* batch variance."""
    unbiased = var * (count / (count - 1))
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Batch Normalization of an ``(N, C, *)`` tensor (same signature as ``F.batch_norm``).

    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", 2015, arXiv:1502.03167. Training normalizes with the batch mean
    and biased variance over (N, *) and, when running buffers are given, updates them in place
    as torch does (``momentum`` weights the new batch; running_var gets the unbiased variance).
    Eval (``training=False``) uses the running statistics.

    ``mask`` (bool, broadcastable to ``x``) keeps padded positions out of the statistics;
    ``reducer`` sums the statistics across processes (see :mod:`normkit.stats`): one collective of
    ``(n, Σ(x−K), Σ(x−K)²)`` per call, taken about a shift ``K`` equal on every process: the layer's
    previous synced mean when the reducer carries a ``ShiftMemory`` (modules' ``process_group``), else
    the running mean (see :func:`normkit.stats.synced_sums`); the running buffers get the global
    batch's moments with the global count — every process updates them identically. With neither
    (a first call) the exact two-pass form runs (two collectives).
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None if running_mean is None else running_mean.numel(), "batch_norm")
    check_param(weight, c, "weight", "batch_norm")
    check_param(bias, c, "bias", "batch_norm")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and running_var")
    # ATen's op treats the running statistics as constants; normkit's eval path is differentiable in them
    # (test-time adaptation mixes them with batch statistics under autograd), so those calls stay here
    native_ok = mask is None and reducer is None and stats_dtype is None and not _tracked(running_mean, running_var)
    if _backend.resolve(backend, x, "batch_norm", native_ok) == "native":
        y = _aten.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if y is not None:
            return y
        backend = "eager"  # ATen's statistics overflowed (running buffers left as they were): normkit's do not
    if not training:
        return channel_affine(x, running_mean, running_var, weight, bias, eps)
    per_channel = x.numel() // c
    if per_channel <= 1 and reducer is None:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    view = (x.shape[0], c, 1, trailing_numel(x))
    m4 = canonical_mask(mask, x, view)
    if m4 is None and reducer is None:
        y, mean, var = normalize_view(
            x.reshape(view), weight, bias, (0, 2, 3), center=True, eps=eps, stats_dtype=stats_dtype, backend=backend,
        )
        count: Tensor | float = float(per_channel)
    else:  # the engine's sums: (n, Σ(x−K), Σ(x−K)²) about a common shift K, one collective with a reducer
        y, mean, var, count = normalize_view(
            x.reshape(view), weight, bias, (0, 2, 3), center=True, eps=eps, mask=m4, reducer=reducer,
            stats_dtype=stats_dtype, backend=backend, shift=running_mean, with_count=True,
        )
        count = count.reshape(c)
    if running_mean is not None and running_var is not None:
        _update_running(running_mean, running_var, mean.reshape(c), var.reshape(c), count, momentum)
    return y.reshape(x.shape)


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Instance Normalization: per-sample, per-channel statistics over the spatial dims.

    Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast
    Stylization", 2016, arXiv:1607.08022. Same signature as ``F.instance_norm``; with running
    buffers the batch-average of the per-instance statistics updates them (torch's behaviour).
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None if running_mean is None else running_mean.numel(), "instance_norm")
    check_param(weight, c, "weight", "instance_norm")
    check_param(bias, c, "bias", "instance_norm")
    impl = _backend.resolve(
        backend, x, "instance_norm", mask is None and stats_dtype is None and not _tracked(running_mean, running_var)
    )
    if impl == "native" and x.dim() >= 3 and x.shape[0] and (use_input_stats or running_mean is not None):
        # (torch's op fails on N = 0 with an affine weight: "select(): index 0 out of range")
        y = _aten.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
        if y is not None:
            return y
        impl = "eager"  # ATen's statistics overflowed (running buffers left as they were): normkit's do not
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
        return channel_affine(x, running_mean, running_var, weight, bias, eps)
    spatial = trailing_numel(x)
    if spatial <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")
    view = (x.shape[0], c, 1, spatial)
    m4 = canonical_mask(mask, x, view)
    y, mean, var = normalize_view(
        x.reshape(view), weight, bias, (2, 3), center=True, eps=eps, mask=m4, stats_dtype=stats_dtype,
        backend="eager" if impl == "native" else impl,
    )
    if running_mean is not None and running_var is not None:
        count = float(spatial) if m4 is None else m4.sum((2, 3)).to(var.dtype).reshape(x.shape[0], c)
        unbiased = var.reshape(x.shape[0], c) * (count / (count - 1))
        with torch.no_grad():
            running_mean.lerp_(mean.reshape(x.shape[0], c).mean(0).to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.mean(0).to(running_var.dtype), momentum)
    return y.reshape(x.shape)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Group Normalization: per-sample statistics over groups of channels and the spatial dims.

    Wu & He, "Group Normalization", 2018, arXiv:1803.08494. Same signature as ``F.group_norm``.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "group_norm")
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups!r} must be a positive divisor of the {c} channels")
    check_param(weight, c, "weight", "group_norm")
    check_param(bias, c, "bias", "group_norm")
    impl = _backend.resolve(backend, x, "group_norm", mask is None and stats_dtype is None)
    if impl == "native":
        y = _aten.group_norm(x, num_groups, weight, bias, eps)
        if y is not None:
            return y
        impl = "kernels"  # ATen's statistics overflowed: normkit's do not
    view = (x.shape[0], num_groups, c // num_groups, trailing_numel(x))
    y = normalize_view(
        x.reshape(view), weight, bias, (2, 3), center=True, eps=eps,
        mask=canonical_mask(mask, x, view), stats_dtype=stats_dtype, backend=impl,
    )[0]
    return y.reshape(x.shape)
