"""Shared plumbing of the functional layer: validation and the route to the kernel.

Each functional norm only decides its canonical ``(N, G, Cg, L)`` view and reduced axes
(see :mod:`normkit.kernels.canonical`) and calls :func:`normalize_view`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normkit.kernels.canonical import normalize as _kernel
from normkit.kernels.canonical import safe_rstd
from normkit.stats import Reducer, accumulation_dtype, reduced_moments


def check_eps(eps: float) -> float:
    if type(eps) is float and eps >= 0:  # the common case first (NaN fails the comparison)
        return eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return float(eps)


def check_float(x: Tensor, name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_channels_first(x: Tensor, num_channels: int | None, what: str) -> int:
    """Validate an ``(N, C, *)`` input and return C."""
    check_float(x)
    if x.dim() < 2:
        raise ValueError(f"{what} expects an input of shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    if num_channels is not None and x.shape[1] != num_channels:
        raise ValueError(
            f"{what} expects {num_channels} channels at dim 1 of an (N, C, *) input, "
            f"got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    return x.shape[1]


def check_param(p: Tensor | None, numel: int, name: str, what: str) -> None:
    if p is not None and p.numel() != numel:
        raise ValueError(f"{what}: {name} must have {numel} elements, got shape {tuple(p.shape)}")


def with_offset(weight: Tensor | None, offset: float) -> Tensor | None:
    """Gemma-style ``offset + w`` (the stored weight is zero-centred)."""
    if weight is None or offset == 0.0:
        return weight
    return weight + offset


def canonical_mask(mask: Tensor | None, x: Tensor, view: Sequence[int]) -> Tensor | None:
    """Broadcast a user mask to the input's shape, then to the canonical view."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = included in the statistics), got {mask.dtype}")
    try:
        full = mask.expand_as(x)
    except RuntimeError as e:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the input shape {tuple(x.shape)}") from e
    return full.reshape(view)


def normalize_view(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    *,
    center: bool,
    eps: float,
    residual: Tensor | None = None,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
    shift: Tensor | None = None,
    with_count: bool = False,
    nlc_out: bool = False,
) -> tuple[Tensor, ...]:
    """Fused kernel when possible; with a mask or reducer, autograd through the statistics engine.

    Returns ``(y, mean, var)`` or, with ``residual``, ``(y, x + residual, mean, var)``; with
    ``with_count`` the (global) number of included positions per statistic is appended (the mask /
    reducer path only). ``shift``: a value common to all processes the synchronized sums are taken
    about (:func:`normkit.stats.reduced_moments`), e.g. the running mean. ``nlc_out``: the channels-first
    kernels write y in ``(N, L, C)`` memory (:func:`normkit.kernels.canonical.normalize`); the mask /
    reducer path keeps x's layout.
    """
    if mask is None and reducer is None:
        return _kernel(
            x4, weight, bias, dims, center=center, eps=eps, residual=residual,
            stats_dtype=stats_dtype, backend=backend, nlc_out=nlc_out,
        )
    s = x4 if residual is None else x4 + residual
    sd = accumulation_dtype(s.dtype, stats_dtype)
    xf = s.to(sd)
    mean, var, count = reduced_moments(xf, dims, center=center, mask=mask, reducer=reducer, shift=shift)
    r = safe_rstd(xf, dims, var, eps, mean=mean, mask=mask, reducer=reducer)  # right where var overflowed
    if mean is None:
        mean = torch.zeros_like(var)
        y = xf * r
    else:
        y = (xf - mean) * r
    shape = (1, x4.shape[1], x4.shape[2], 1)
    if weight is not None:
        y = y * weight.reshape(shape).to(sd)
    if bias is not None:
        y = y + bias.reshape(shape).to(sd)
    y = y.to(x4.dtype)
    stats = (mean.detach(), var.detach()) + ((count.detach(),) if with_count else ())
    return (y, *stats) if residual is None else (y, s, *stats)


def snapshot(*parts: Tensor) -> Tensor:
    """Concatenate statistics (one dtype) into one fresh 1-D tensor that torch.compile saves for backward.

    Values the backward needs are computed from buffers (the step counter, running statistics)
    that the forward then updates in place. AOTAutograd's partitioner computes a value used
    only by the backward *in* the backward, and may recompute cheap ones there, from the graph
    inputs; a mutated buffer then has its post-update contents (silently wrong gradients,
    pytorch/pytorch PR #197039; e.g. a counter read off by one step). Concatenating them with a
    value the forward uses (put that first) makes one ``aten.cat`` node that the forward must
    compute and that is not on the recompute allowlist, so it is saved: the backward sees this
    step's values. Used by PowerNorm, Unified Norm, PRepBN and AdaB2N; a regression test in each
    fails without it. Split the result to get the parts back.
    """
    return torch.cat([p.reshape(-1) for p in parts])


def check_momentum(momentum: float | None, what: str, *, allow_none: bool = False, hint: str = "") -> float | None:
    """``momentum`` as a float in [0, 1] (``None`` passes through when ``allow_none``); ValueError naming ``what``."""
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        extra = " or None (cumulative average)" if allow_none else ""
        raise ValueError(f"{what}: momentum must be a number in [0, 1]{extra}{hint}, got {momentum!r}")
    return float(momentum)


def trailing_numel(x: Tensor, start: int = 2) -> int:
    """``prod(x.shape[start:])``: the explicit size of a flattened trailing block.

    Use it instead of ``-1`` in a ``reshape``: for a tensor with no elements (N = 0) ``-1`` is
    ambiguous and torch raises "cannot reshape tensor of 0 elements".
    """
    return math.prod(x.shape[start:])


def channel_view(p: Tensor, x: Tensor, channels_last: bool = False) -> Tensor:
    """A per-channel ``(C,)`` tensor shaped to broadcast against ``x`` (``(N, C, *)``, or ``(*, C)``)."""
    return p.reshape(-1) if channels_last else p.reshape((1, -1) + (1,) * (x.dim() - 2))

