"""Closed-form kernels for the two norms without per-channel moments: ScaleNorm and DyT.

Same pattern as :mod:`normkit.kernels.normalize`: pure forward/backward math, run as is by the
``"eager"`` backend and through ``torch.compile`` by ``"compiled"``, wrapped in an autograd
function that saves only the input (plus O(rows) statistics).

ScaleNorm, ``y = g · x / n`` with ``n = max(‖x‖, eps)``::

    ∂L/∂x = (g / n) · (ĝ − x · (ĝ·x) / n²)   where ‖x‖ > eps, else (g / eps) · ĝ
    ∂L/∂g = Σ ĝ · x / n

DyT, ``y = w · tanh(α x) + b`` with ``t = tanh(α x)`` recomputed in backward::

    ∂L/∂x = α · w · (1 − t²) · ĝ,   ∂L/∂α = Σ w · (1 − t²) · x · ĝ,
    ∂L/∂w = Σ_rows ĝ · t,           ∂L/∂b = Σ_rows ĝ
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.kernels.normalize import column_sum
from normkit.stats import accumulation_dtype, mean_square


def _scale_forward(x: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xf = x.to(accumulation_dtype(x.dtype))
    norm = (mean_square(xf, -1) * x.shape[-1]).sqrt()
    return (xf * (scale.to(xf.dtype) / norm.clamp_min(eps))).to(x.dtype), norm


def _scale_backward(g: Tensor, x: Tensor, scale: Tensor, norm: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    sd = norm.dtype
    gf, xf = g.to(sd), x.to(sd)
    n = norm.clamp_min(eps)
    dot = (gf * xf).sum(-1, keepdim=True)
    proj = torch.where(norm > eps, dot / (n * n), torch.zeros_like(n))
    dx = torch.addcmul(gf, xf, proj, value=-1.0).mul_(scale.to(sd) / n)
    dscale = (dot / n).sum()
    return dx.to(x.dtype), dscale.reshape(scale.shape).to(scale.dtype)


class _ScaleNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, eps, impl):  # noqa: ANN001, ANN205
        key = (eps, x.dtype)
        y, norm = _backend.executor(impl, _scale_forward, key)(x, scale, eps)
        ctx.save_for_backward(x, scale, norm)
        ctx.cfg = (eps, impl, key)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, scale, norm = ctx.saved_tensors
        eps, impl, key = ctx.cfg
        dx, ds = _backend.executor(impl, _scale_backward, key)(g, x, scale, norm, eps)
        return dx, ds, None, None


def _affine_shape(x: Tensor, channels_last: bool) -> tuple[int, ...]:
    return (-1,) if channels_last else (-1,) + (1,) * (x.dim() - 2)


def _per_channel_sum(t: Tensor, channels_last: bool) -> Tensor:
    """Sum over everything but the channel dim, through the kernel's blocked column sum."""
    if channels_last:
        return column_sum(t.reshape(-1, 1, t.shape[-1], 1)).reshape(-1)
    return column_sum(t.reshape(t.shape[0], 1, t.shape[1], -1)).reshape(-1)


def _tanh(z: Tensor) -> Tensor:
    """``tanh(z)``; under ``torch.compile`` as ``1 − 2 / (exp(2z) + 1)``.

    Inductor's vectorized ``exp`` is cheaper than its ``tanh`` on CPU (DyT is compute-bound there:
    ~35% faster forward); the absolute error stays below 2.5e-7 in fp32 (≤ 4 ulp of 1), and the
    form saturates correctly to ±1 for large |z| (exp → inf or 0). Eager keeps ATen's tanh.
    """
    if torch.compiler.is_compiling():
        return 1 - 2 / (torch.exp(2 * z) + 1)
    return torch.tanh(z)


def _dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    y = _tanh(alpha * x)
    shape = _affine_shape(x, channels_last)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _dyt_backward(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    t = _tanh(alpha * x)
    shape = _affine_shape(x, channels_last)
    gw = g if weight is None else g * weight.reshape(shape)
    dpre = gw * (1 - t * t)
    dx = dpre * alpha
    dalpha = (dpre * x).sum().reshape(alpha.shape)
    dw = _per_channel_sum(g * t, channels_last) if weight is not None else None
    db = _per_channel_sum(g, channels_last) if has_bias else None
    return dx, dalpha, dw, db


class _DyTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last, impl):  # noqa: ANN001, ANN205
        key = (channels_last, x.dtype, weight is None, bias is None)
        y = _backend.executor(impl, _dyt_forward, key)(x, alpha, weight, bias, channels_last)
        ctx.save_for_backward(x, alpha, weight)
        ctx.cfg = (channels_last, impl, key, weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, alpha, weight = ctx.saved_tensors
        channels_last, impl, key, has_w, has_b = ctx.cfg
        dx, da, dw, db = _backend.executor(impl, _dyt_backward, key)(g, x, alpha, weight if has_w else None, channels_last, has_b)
        return dx, da, dw, db, None, None


def scale_norm(x: Tensor, scale: Tensor, eps: float, backend: str | None) -> Tensor:
    impl = _backend.resolve(backend, x, "scale_norm")
    if impl == "triton":
        return _backend.triton_kernel("scale_norm")(x, scale, eps)
    return _ScaleNormFn.apply(x, scale, eps, impl)


def dyt(
    x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool, backend: str | None
) -> Tensor:
    impl = _backend.resolve(backend, x, "dyt")
    if impl == "triton":
        return _backend.triton_kernel("dyt")(x, alpha, weight, bias, channels_last)
    return _DyTFn.apply(x, alpha, weight, bias, channels_last, impl)
