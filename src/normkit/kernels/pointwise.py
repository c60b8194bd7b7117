"""Closed-form kernels for the two norms without per-channel moments: ScaleNorm and DyT.

Same pattern as :mod:`normkit.kernels.canonical`: pure forward/backward math, run as is by the
``"eager"`` backend and through ``torch.compile`` by ``"inductor"``, wrapped in an autograd
function that saves only the input (plus O(rows) statistics). ``"compiled"`` runs DyT on CPU as
normkit's C++ kernel (:mod:`normkit.kernels.cpu`: tanh and sech² from one exp/expm1 per element,
∂w/∂b/∂α summed inside the row loop) and ScaleNorm as ``"inductor"`` (already at target there).

ScaleNorm, ``y = g · x / n`` with ``n = max(‖x‖, eps)``::

    ∂L/∂x = (g / n) · (ĝ − x · (ĝ·x) / n²)   where ‖x‖ > eps, else (g / eps) · ĝ
    ∂L/∂g = Σ ĝ · x / n

DyT, ``y = w · tanh(α x) + b`` with ``t = tanh(α x)`` recomputed in backward (``"inductor"``:
1 − t² evaluated as a sech² that keeps its digits where t ≈ ±1, see :func:`_sech2`)::

    ∂L/∂x = α · w · (1 − t²) · ĝ,   ∂L/∂α = Σ w · (1 − t²) · x · ĝ,
    ∂L/∂w = Σ_rows ĝ · t,           ∂L/∂b = Σ_rows ĝ
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.kernels import cpu as _cpu
from normkit.kernels import ops as _ops
from normkit.kernels.canonical import column_sum
from normkit.stats import accumulation_dtype, mean_square, rescue_scale

#: no-grad ScaleNorm calls from this many input elements check ‖x‖ for overflow on the plain-expression path
_INFERENCE_CHECK_MIN_NUMEL = 1 << 16


def _l2_norm(xf: Tensor, dim: int = -1) -> Tensor:
    """‖x‖ over ``dim`` (kept), through the statistics engine (overflow-safe: :func:`_rescued_norm`)."""
    return _rescued_norm(xf, (mean_square(xf, dim) * xf.shape[dim]).sqrt(), dim)


def _rescued_norm(x: Tensor, norm: Tensor, dim: int) -> Tensor:
    """``norm`` (‖x‖ over ``dim``), recomputed as ``‖c·x‖ / c`` where Σx² overflowed the float range.

    A finite float32 row with |x| past ~1e19 has Σx² = inf and ScaleNorm would return zeros;
    ``c = 2^−(max_exp/2 + 6)`` (exact, as :func:`normkit.kernels.canonical.safe_rstd`) brings the
    squares into range. Eager CPU code checks the norms with one reduction and a host read and
    rescues only when needed; compiled code and other devices select branch-free. NaN stays NaN,
    an inf entry gives an inf norm (as the math).
    """
    if not torch.compiler.is_compiling() and norm.is_cpu and math.isfinite(norm.sum().item()):
        return norm
    c = rescue_scale(norm.dtype)
    scaled = torch.linalg.vector_norm(x.to(norm.dtype) * c, dim=dim, keepdim=True) / c
    return torch.where(torch.isfinite(norm), norm, scaled)


def _scale_forward(x: Tensor, scale: Tensor, eps: float, dim: int = -1) -> tuple[Tensor, Tensor]:
    xf = x.to(accumulation_dtype(x.dtype))
    norm = _l2_norm(xf, dim)
    return (xf * (scale.to(xf.dtype) / norm.clamp_min(eps))).to(x.dtype), norm


def _scale_backward(
    g: Tensor, x: Tensor, scale: Tensor, norm: Tensor, eps: float, dim: int = -1
) -> tuple[Tensor, Tensor]:
    sd = norm.dtype
    gf, xf = g.to(sd), x.to(sd)
    n = norm.clamp_min(eps)
    dot = (gf * xf).sum(dim, keepdim=True)
    proj = torch.where(norm > eps, dot / n / n, torch.zeros_like(n))  # (n·n overflows for ‖x‖ past ~1e19)
    dx = torch.addcmul(gf, xf, proj, value=-1.0).mul_(scale.to(sd) / n)
    dscale = (dot / n).sum()
    return dx.to(x.dtype), dscale.reshape(scale.shape).to(scale.dtype)


class _ScaleNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, eps, dim, impl):  # noqa: ANN001, ANN205
        key = (eps, x.dtype, dim)
        y, norm = _backend.executor(impl, _scale_forward, key)(x, scale, eps, dim)
        ctx.save_for_backward(x, scale, norm)
        ctx.cfg = (eps, dim, impl, key)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, scale, norm = ctx.saved_tensors
        eps, dim, impl, key = ctx.cfg
        if torch.is_grad_enabled():  # create_graph=True: ‖x‖ recomputed with autograd recording
            norm = _l2_norm(x.to(norm.dtype), dim)
            return (*_scale_backward(g, x, scale, norm, eps, dim), None, None, None)
        dx, ds = _backend.executor(impl, _scale_backward, key)(g, x, scale, norm, eps, dim)
        return dx, ds, None, None, None


def _affine_shape(x: Tensor, channels_last: bool) -> tuple[int, ...]:
    return (-1,) if channels_last else (-1,) + (1,) * (x.dim() - 2)


def _per_channel_sum(t: Tensor, channels_last: bool, max_blocks: int = 256) -> Tensor:
    """Sum over everything but the channel dim, through the kernel's blocked column sum."""
    if channels_last:
        return column_sum(t.reshape(-1, 1, t.shape[-1], 1), max_blocks).reshape(-1)
    return column_sum(t.reshape(t.shape[0], 1, t.shape[1], -1), max_blocks).reshape(-1)


def _tanh(z: Tensor) -> Tensor:
    """``tanh(z)``; under ``torch.compile`` as ``1 − 2 / (exp(2z) + 1)``.

    Inductor's vectorized ``exp`` is cheaper than its ``tanh`` on CPU (DyT is compute-bound there:
    2.1 vs 6.6 ms at 8192×1024); the absolute error stays below 2.5e-7 in fp32 (≤ 4 ulp of 1),
    and the form saturates correctly to ±1 for large |z| (exp → inf or 0). Eager keeps ATen's tanh.
    """
    if torch.compiler.is_compiling():
        return 1 - 2 / (torch.exp(2 * z) + 1)
    return torch.tanh(z)


def _sech2(z: Tensor) -> Tensor:
    """``1 − tanh²(z)`` without cancellation, for the compiled backward: ``4e / (1 + e)²`` with
    ``e = exp(−2|z|)`` (no overflow; exact where ``t ≈ ±1``, where ``1 − t²`` from an fp32 ``t``
    keeps no correct digit — 12× the error of ATen's tanh in ∂L/∂α, measured)."""
    e = torch.exp(-2 * z.abs())
    r = 1 / (1 + e)
    return 4 * e * r * r


def _dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    y = _tanh(alpha * x)
    if channels_last:  # per-channel vectors broadcast as they are (no reshape op per call)
        w, b = weight, bias
    else:
        shape = _affine_shape(x, channels_last)
        w = None if weight is None else weight.reshape(shape)
        b = None if bias is None else bias.reshape(shape)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    # the input's dtype, as every normkit norm and the kernel path (official DyT code would promote
    # a bf16 input to fp32 through fp32 parameters)
    return y.to(x.dtype)


def _dyt_backward(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    z = alpha * x
    shape = _affine_shape(x, channels_last)
    gw = g if weight is None else g * weight.reshape(shape)
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Two independent expressions of z: the ∂L/∂x loop uses sech², the column pass for ∂L/∂w
        # evaluates t itself (one more exp per element) instead of the row loop writing t to a
        # 32 MiB temporary that the column pass reads back; the column pass sums in up to 1024 row blocks
        # (8 rows each at 8192 rows).
        # Backward at 8192×1024 fp32: 7.7 → 7.3 ms with memory reused, 26.4 → 17.2 ms where the
        # temporary has to be faulted in (glibc's default for 32 MiB).
        sech2, t_cols, blocks = _sech2(z), _tanh(z), 1024
    else:
        t_cols = torch.tanh(z)
        sech2, blocks = 1 - t_cols * t_cols, 256
    dpre = gw * sech2
    dx = dpre * alpha
    # ∂L/∂α through per-row sums first: the compiler fuses them into the ∂L/∂x loop
    dalpha = (dpre * x).sum(-1).sum().reshape(alpha.shape)
    dw = _per_channel_sum(g * t_cols, channels_last, blocks) if weight is not None else None
    db = _per_channel_sum(g, channels_last, blocks) if has_bias else None
    return dx, dalpha, dw, db


class _DyTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last, impl):  # noqa: ANN001, ANN205
        key = (channels_last, x.dtype, weight is None, bias is None)
        cpu = impl in ("kernels", "compiled") and _ops.accepts(x, alpha, weight, bias)
        if cpu:  # normkit's CPU kernel: one exp per element, column sums inside the row loop
            y = _cpu.dyt_forward(x, alpha, weight, bias, channels_last)
        else:
            y = _backend.executor(impl, _dyt_forward, key)(x, alpha, weight, bias, channels_last)
        ctx.save_for_backward(x, alpha, weight)
        ctx.cfg = (channels_last, impl, key, cpu, None if weight is None else weight.shape, None if bias is None else bias.shape)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, alpha, weight = ctx.saved_tensors
        channels_last, impl, key, cpu, w_shape, b_shape = ctx.cfg
        has_b = b_shape is not None
        if torch.is_grad_enabled():  # create_graph=True: the eager math is differentiable in x, α, w
            dx, da, dw, db = _dyt_backward(g, x, alpha, weight, channels_last, has_b)
        elif cpu:
            want_w, want_b = weight is not None and ctx.needs_input_grad[2], has_b and ctx.needs_input_grad[3]
            dx, da, dw, db = _cpu.dyt_backward(g, x, alpha, weight, channels_last, want_w, want_b)
            dx = dx.view(x.shape)
        else:
            dx, da, dw, db = _backend.executor(impl, _dyt_backward, key)(g, x, alpha, weight, channels_last, has_b)
        # parameters may carry singleton dims (e.g. a (C, 1, 1) weight); the sums come out flat
        dw = None if dw is None else dw.reshape(w_shape)
        db = None if db is None else db.reshape(b_shape)
        return dx, da, dw, db, None, None


def _dyt_op_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, alpha, weight, bias, channels_last = inputs
    ctx.save_for_backward(x, alpha, weight)
    ctx.cfg = (channels_last, None if bias is None else bias.shape)


def _dyt_op_backward(ctx, g):  # noqa: ANN001, ANN202
    """Autograd of ``torch.ops.normkit.dyt``: its backward operator, or for a double backward
    (``create_graph=True``) :func:`_dyt_backward`, which is differentiable in x, α and w."""
    x, alpha, weight = ctx.saved_tensors
    channels_last, bias_shape = ctx.cfg
    want_w = weight is not None and ctx.needs_input_grad[2]
    want_b = bias_shape is not None and ctx.needs_input_grad[3]
    if torch.is_grad_enabled():
        dx, da, dw, db = _dyt_backward(g, x, alpha, weight, channels_last, bias_shape is not None)
    else:
        dx, da, dw, db = torch.ops.normkit.dyt_backward(g, x, alpha, weight, channels_last, want_w, want_b)
    dw = dw.reshape(weight.shape) if want_w else None
    db = db.reshape(bias_shape) if want_b else None
    return dx, da, dw, db, None


_ops.dyt.register_autograd(_dyt_op_backward, setup_context=_dyt_op_setup)


def scale_norm(x: Tensor, scale: Tensor, eps: float, backend: str | None, dim: int = -1) -> Tensor:
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    impl = _backend.resolve(backend, x, "scale_norm", True, needs_grad)
    if impl == "native":  # the plain torch code (autograd through ATen's ops): cheapest per call
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=accumulation_dtype(x.dtype))
        # the overflow check (~7 µs) is ~1% of a small call with a backward but ~15% of a small
        # inference call, which stays unchecked as torch's own op (as normkit.functional.aten's policy)
        if needs_grad or x.numel() >= _INFERENCE_CHECK_MIN_NUMEL:
            if torch.compiler.is_compiling() or not norm.is_cpu:
                norm = _rescued_norm(x, norm, dim)
            elif not math.isfinite(norm.sum().item()):
                impl = "eager"  # Σx² overflowed: the closed form rescues ‖x‖ and keeps its backward in range
        if impl == "native":
            return x * (scale / norm.clamp_min(eps)).to(x.dtype)
    if impl == "triton":
        return _backend.triton_kernel("scale_norm")(x, scale, eps, dim)
    return _ScaleNormFn.apply(x, scale, eps, dim, impl)


def dyt(
    x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool, backend: str | None
) -> Tensor:
    impl = _backend.resolve(backend, x, "dyt", True)
    if impl == "native":  # the plain torch code (autograd through ATen's ops): cheapest per call
        return _dyt_forward(x, alpha, weight, bias, channels_last)
    if impl == "triton":
        return _backend.triton_kernel("dyt")(x, alpha, weight, bias, channels_last)
    if impl == "kernels" and torch.compiler.is_compiling() and _ops.accepts(x, alpha, weight, bias):
        return torch.ops.normkit.dyt(x, alpha, weight, bias, channels_last)  # kept as a node in the user's graph
    return _DyTFn.apply(x, alpha, weight, bias, channels_last, impl)
