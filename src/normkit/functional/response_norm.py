"""Response norms: Filter Response Normalization (+TLU) and Global Response Normalization.

Both are per-sample, batch-independent and identical in train and eval. The default path
(:mod:`normkit.functional._closed_form`) is FRN = the statistics engine's RMS instance norm
(normkit's C++ segment kernel on CPU) + a TLU autograd function, and GRN = one autograd function
with a closed-form backward; ``backend="eager"`` runs the plain formulas below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional._closed_form import (
    affine,
    nc_dot,
    nc_view,
    param_grad,
    route,
)
from normkit.functional._core import (
    check_channels_first,
    check_eps,
    check_float,
    check_param,
    normalize_view,
    trailing_numel,
)
from normkit.functional._replay import replay_grads
from normkit.kernels.canonical import safe_rstd
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
    nu2 = mean_square(flat, 2)
    e = eps if learned_eps is None else eps + learned_eps.to(sd).abs().reshape(())
    r = safe_rstd(flat, (2,), nu2, e)  # right where ν² overflowed (|x| past ~1.8e19 in float32)
    y = affine(xf * r.reshape((x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)), weight, bias)
    if tau is not None:
        y = torch.maximum(y, nc_view(tau, x).to(sd))
    return y.to(x.dtype)


class _TLUFn(torch.autograd.Function):
    """``max(y, τ)`` in place on the engine's fresh output; saves the 0/1 mask [y ≥ τ], not y.

    The mask is float (the input's size): ``g·mask`` is one pass, where ``torch.where`` on a bool
    mask measured ~4× a copy and ``g·bool_mask`` ~2.7× (the cast first).

    Ties (y = τ) give the gradient to y, as TF's ``tf.maximum`` in the paper's code (torch's
    ``maximum`` splits it); y is NaN where the input was (``maximum`` propagates NaN).
    """

    @staticmethod
    def forward(ctx, y: Tensor, tau: Tensor) -> Tensor:  # noqa: ANN001
        t = nc_view(tau, y).to(y.dtype)
        keep = torch.ge(y, t, out=torch.empty_like(y))
        torch.maximum(y, t, out=y)
        ctx.mark_dirty(y)
        ctx.save_for_backward(keep)
        ctx.tau = (tau.shape, tau.dtype)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
        (keep,) = ctx.saved_tensors
        gy = g * keep
        gt = None
        if ctx.needs_input_grad[1]:
            dims = (0, *range(2, g.dim()))
            shape, dtype = ctx.tau
            gt = (g.sum(dims) - gy.sum(dims)).reshape(shape).to(dtype)  # Σ g over the positions y < τ
        return (gy if ctx.needs_input_grad[0] else None), gt


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

    Default path: the statistics engine's RMS instance norm (``normalize_view`` over the
    ``(N, C, 1, L)`` view: normkit's C++ segment kernel on CPU, closed-form backward, saves x)
    with γ, β, then the TLU in place, saving a 0/1 mask (2× the input in all). At a tie
    y = τ the gradient goes to y (TF's ``tf.maximum``, the paper's code); the ``"eager"``
    formula uses torch's ``maximum``, which splits it. A learned ε takes the plain formula.
    ν² past the float range (|x| ≳ 1.8e19 in float32) is handled by the kernel / ``safe_rstd``.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "filter_response_norm")
    check_param(weight, c, "weight", "filter_response_norm")
    check_param(bias, c, "bias", "filter_response_norm")
    check_param(tau, c, "tau", "filter_response_norm")
    if learned_eps is not None and learned_eps.numel() != 1:
        raise ValueError(f"filter_response_norm: learned_eps must be a single value, got shape {tuple(learned_eps.shape)}")
    impl = route(backend, x, "frn", stats_dtype)
    if impl == "fast" and learned_eps is None:
        n = x.shape[0]
        y = normalize_view(x.reshape(n, c, 1, trailing_numel(x)), weight, bias, (2, 3), center=False, eps=eps,
                           backend=backend)[0]
        if tau is not None:
            y = _TLUFn.apply(y, tau)
        return y.reshape(x.shape)
    impl = "eager" if impl == "fast" else impl
    key = (eps, stats_dtype, x.dtype, weight is not None, bias is not None, tau is not None, learned_eps is not None)
    return _backend.executor(impl, _frn_math, key)(x, weight, bias, tau, learned_eps, eps, stats_dtype)


def _safe_l2(x: Tensor, dim: int) -> Tensor:
    """``‖x‖₂`` over ``dim`` that stays right where the sum of squares over- or underflows.

    A float32 row with |x| past ~1.8e19 has Σx² = inf (``vector_norm`` does not rescale), and one
    with |x| below ~1e-19 loses its squares to underflow. Such rows are recomputed from the row
    scaled by the exact power of two 2^−e of its largest |x|: ``‖x‖ = 2^e·‖x·2^−e‖``. Eager code on
    CPU checks the row norms (one op on O(rows) values) and rescues only when needed; under a
    compiler and on other devices it is branch-free. NaN stays NaN, ±inf gives inf.
    """
    g = torch.linalg.vector_norm(x, 2, dim=dim)
    fi = torch.finfo(g.dtype)
    lo = math.sqrt(fi.tiny) * 1024.0  # below it some squares were subnormal
    if g.numel() == 0:
        return g
    if not torch.compiler.is_compiling() and g.is_cpu:
        mn, mx = torch.aminmax(g)
        if mn.item() >= lo and mx.item() <= fi.max:
            return g
    with torch.no_grad():
        e = torch.frexp(torch.linalg.vector_norm(x, math.inf, dim=dim, keepdim=True)).exponent
        lim = math.frexp(fi.max)[1] - 8  # 2^±e stays finite (float32: ±120); subnormal rows still scale up
        scale = torch.exp2(e.clamp(-lim, lim).to(g.dtype))  # exact powers of two (torch.ldexp's gradient is 0)
    scaled = torch.linalg.vector_norm(x / scale, 2, dim=dim) * scale.squeeze(dim)
    bad = ~torch.isfinite(g) | (g < lo)
    return torch.where(bad, scaled, g)


def _flat(x: Tensor, channels_last: bool) -> Tensor:
    """GRN's input as ``(N, L, C)`` (channels-last) or ``(N, C, L)``, the spatial dims flattened (N = 0 too)."""
    if channels_last:
        return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
    return x.reshape(x.shape[0], x.shape[1], trailing_numel(x))


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
    n, c = x.shape[0], x.shape[-1] if channels_last else x.shape[1]
    # ‖x‖ over the spatial dims, overflow-safe: flattened to (N, L, C) or (N, C, L)
    flat = _flat(xf, channels_last)
    gx = _safe_l2(flat, 1 if channels_last else 2)  # (N, C)
    nx = gx / (gx.mean(1, keepdim=True) + eps)
    nx = nx.reshape((n,) + (1,) * (x.dim() - 2) + (c,)) if channels_last else nc_view(nx, x)
    return (affine(xf * nx, weight, bias, channels_last) + xf).to(x.dtype)


class _GRNFn(torch.autograd.Function):
    """GRN as ``y = x·k + β`` with the per-(sample, channel) factor ``k = 1 + γ·N``.

    Backward, with D = Σ_L g·x and Z = mean_C G + eps (G = ‖x‖ over L, N = G/Z)::

        ∂L/∂N  = γ·D
        ∂L/∂G  = (∂L/∂N − mean_C(∂L/∂N · N)) / Z
        ∂L/∂x  = g·k + x · ∂L/∂G / G            (0 where G = 0, as vector_norm's subgradient)
        ∂L/∂γ  = Σ_N N·D,   ∂L/∂β = Σ_{N,L} g

    Saves x plus O(N·C) statistics; two input-sized passes each way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, channels_last):  # noqa: ANN001, ANN205
        n, c = x.shape[0], x.shape[-1] if channels_last else x.shape[1]
        flat = _flat(x, channels_last)
        g = _safe_l2(flat, 1 if channels_last else 2)
        z = g.mean(1, keepdim=True) + eps
        nx = g / z
        k = 1 + nx if weight is None else torch.addcmul(torch.ones_like(nx), nx, weight.to(x.dtype).reshape(1, c))
        kb = k.reshape(n, 1, c) if channels_last else k.reshape(n, c, 1)
        if bias is None:
            y = flat * kb
        else:
            b = bias.to(x.dtype).reshape((1, 1, c) if channels_last else (1, c, 1))
            y = torch.addcmul(b, flat, kb)
        ctx.save_for_backward(x, weight, bias, g, z, k)
        ctx.cfg = (eps, channels_last)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, weight, bias, g, z, k = ctx.saved_tensors
        eps, cl = ctx.cfg
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain formula
            dx, dw, db = replay_grads(
                lambda x, w, b: _grn_math(x, w, b, eps, cl, None), (x, weight, bias), need[:3], gy
            )
            return dx, dw, db, None, None
        n, c = g.shape
        gy = gy.contiguous()
        if cl:
            gf, xf = _flat(gy, True), _flat(x, True)
            d = torch.linalg.vecdot(gf, xf, dim=1)
        else:
            gf, xf = _flat(gy, False), _flat(x, False)
            d = nc_dot(gf, xf)
        nx = g / z
        dn = d if weight is None else d * weight.to(d.dtype).reshape(1, c)
        dgn = (dn - (dn * nx).mean(1, keepdim=True)) / z
        coef = torch.where(g > 0, dgn / g, 0.0)
        dx = None
        if need[0]:
            shape = (n, 1, c) if cl else (n, c, 1)
            dx = (gf * k.reshape(shape)).addcmul_(xf, coef.reshape(shape)).reshape(x.shape)
        dw = param_grad((nx * d).sum(0), weight, need[1])
        db = param_grad(gf.sum((0, 1) if cl else (0, 2)), bias, need[2])
        return dx, dw, db, None, None


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

    Default path: one autograd function (:class:`_GRNFn`, y = x·(1 + γN) + β, closed-form
    backward, saves x). ‖x‖ is computed overflow- and underflow-safe (:func:`_safe_l2`) on every
    path.
    """
    eps = check_eps(eps)
    check_float(x)
    if x.dim() < 3:
        layout = "(N, *spatial, C)" if channels_last else "(N, C, *spatial)"
        raise ValueError(f"global_response_norm expects {layout} input with at least one spatial dim, got shape {tuple(x.shape)}")
    c = x.shape[-1] if channels_last else x.shape[1]
    check_param(weight, c, "weight", "global_response_norm")
    check_param(bias, c, "bias", "global_response_norm")
    impl = route(backend, x, "grn", stats_dtype)
    if impl == "fast":
        return _GRNFn.apply(x, weight, bias, eps, bool(channels_last))
    key = (eps, bool(channels_last), stats_dtype, x.dtype, weight is not None, bias is not None)
    return _backend.executor(impl, _grn_math, key)(x, weight, bias, eps, bool(channels_last), stats_dtype)
