"""normkit's C++ CPU kernels as torch operators (``torch.ops.normkit.*``).

Each kernel of :mod:`normkit.kernels.cpu` is registered with :func:`torch.library.custom_op`, with a
fake (meta) implementation for shape propagation and, for the forward ops, an autograd formula
whose backward is the matching backward operator (DyT's is registered in
:mod:`normkit.kernels.pointwise`, next to the math its double backward uses). So ``torch.compile(model, fullgraph=True)`` keeps
the kernels as opaque nodes (no graph break, no trace of the eager math) and ``torch.export``
records them; :func:`torch.library.opcheck` checks the registrations (tests).

=============================  ==========================================================
operator                       computes
=============================  ==========================================================
``seg_norm``                   rows / GroupNorm / InstanceNorm segments (optional residual)
``seg_norm_backward``          its closed-form backward (∂x, ∂w, ∂b)
``cf_norm``                    channels-first LayerNorm/RMSNorm over C at every position
``cf_norm_backward``           its backward
``dyt`` / ``dyt_backward``     Dynamic Tanh and its backward
``evonorm_b0[_backward]``      EvoNorm-B0 (``csrc/evonorm.cpp``) and its closed-form backward
``evonorm_s0[_backward]``      EvoNorm-S0 and its closed-form backward
``region_norm[_backward]``     Region Normalization (RN-B/RN-L, ``csrc/region_norm.cpp``) and its backward
``rep_batch_norm_stats``       RepBN / PRepBN pass 1: row LN statistics + batch statistics (``csrc/rep_batch_norm.cpp``)
``rep_batch_norm_mix[_bwd]``   RepBN or PRepBN's λ-mix from those statistics, and its closed-form backward
=============================  ==========================================================

Why ``custom_op`` over a ``TORCH_LIBRARY`` C++ extension: the kernels are plain C entry points
built in ~1.5 s with the system compiler; a C++ extension would compile against torch's headers
(a minute on 2 cores) on every new machine. Why eager calls do not go through these operators:
a ``custom_op`` call costs ~30-70 µs of Python dispatch on the 2-core machine against ~10 µs for
the :class:`torch.autograd.Function` the eager path uses (both call the same wrappers in
:mod:`normkit.kernels.cpu`), which matters at small shapes; :mod:`normkit.kernels.canonical` and
:mod:`normkit.kernels.pointwise` use the operators only under a compiler
(:func:`torch.compiler.is_compiling`).

Outputs that a configuration does not produce (the residual sum without a residual, ∂w without a
weight) are returned as empty tensors, since operators return a fixed number of tensors and may
not alias their inputs.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.kernels import cpu as _cpu
from normkit.stats import mean_square, moments

log = logging.getLogger("normkit")
_reported = False


@torch.compiler.assume_constant_result  # evaluated once at trace time, not traced into
def kernels_available() -> bool:
    """``"auto"``'s check: build/load the kernels on first use, report the outcome once.

    A successful build is logged (INFO, logger ``normkit``) with its time; a missing compiler or a
    failed build gives one warning (not when disabled with ``NORMKIT_CPU_KERNELS=0``), and
    ``"auto"`` then uses ATen's ops or the eager math.
    """
    global _reported
    ok = _cpu.available()
    if not _reported:
        _reported = True
        if ok:
            log.info("normkit: %s", _cpu.status())
        elif os.environ.get("NORMKIT_CPU_KERNELS", "1") != "0" and _cpu._compiler() is None:
            # (a failed build has already warned, from normkit.kernels.cpu)
            warnings.warn(
                f"normkit: {_cpu.status()}; backends 'auto' and 'kernels' use ATen's ops and the eager math "
                "instead, 'compiled' uses Inductor",
                RuntimeWarning, stacklevel=4,
            )
    return ok


_backend.register_cpu_kernels(kernels_available)


def accepts(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the kernels take ``x`` and these parameters (same dtype, on the CPU), building them on
    first use; safe to call while Dynamo traces (unlike :func:`normkit.kernels.cpu.supports`)."""
    if x.numel() == 0 or not _backend.kernels_apply(x):
        return False
    return all(p is None or (p.dtype == x.dtype and p.device.type == "cpu") for p in params)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _maybe(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


# ---------------------------------------------------------------- segments (rows, GroupNorm, InstanceNorm)


@torch.library.custom_op("normkit::seg_norm", mutates_args=(), device_types="cpu")
def seg_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    n: int, c: int, length: int, groups: int, center: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``n`` contiguous segments of ``c·length`` values of ``x (+ residual)``.

    Returns ``(y, s, mean, var, rstd)``: ``s = x + residual`` (empty without a residual) and flat
    per-segment statistics. The affine of segment ``i`` is ``weight[(i % groups)·c + k]``.
    """
    y, s, mean, var, rstd = _cpu.seg_forward(
        x.contiguous(), residual, weight, bias, n, c, length, groups, center, eps
    )
    return y.view(x.shape), (_empty(x) if residual is None else s.view(x.shape)), mean, var, rstd


@seg_norm.register_fake
def _(x, residual, weight, bias, n, c, length, groups, center, eps):  # noqa: ANN001, ANN202
    stats = [x.new_empty(n) for _ in range(3)]
    return torch.empty_like(x), (_empty(x) if residual is None else torch.empty_like(x)), *stats


@torch.library.custom_op("normkit::seg_norm_backward", mutates_args=(), device_types="cpu")
def seg_norm_backward(
    g: Tensor, gs: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    n: int, c: int, length: int, groups: int, center: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂x, ∂w, ∂b)`` of :func:`seg_norm` (∂x includes ``gs``, the gradient reaching ``s``); ∂w/∂b
    are empty unless asked for."""
    dx, dw, db = _cpu.seg_backward(g, gs, s, weight, mean, rstd, n, c, length, groups, center, want_w, want_b)
    return dx.view(s.shape), (_empty(s) if dw is None else dw), (_empty(s) if db is None else db)


@seg_norm_backward.register_fake
def _(g, gs, s, weight, mean, rstd, n, c, length, groups, center, want_w, want_b):  # noqa: ANN001, ANN202
    k = groups * c
    return torch.empty_like(s), s.new_empty(k if want_w else 0), s.new_empty(k if want_b else 0)


def differentiable_backward(
    gy: Tensor, gs: Tensor | None, s: Tensor, weight: Tensor | None, view: tuple[int, ...], dims: tuple[int, ...],
    center: bool, eps: float, sd: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """∂L/∂s and ∂L/∂w for a double backward (``create_graph=True``): autograd through a plain
    statement of the forward on the canonical ``(N, G, Cg, L)`` ``view`` (in the statistics dtype
    ``sd``, default ``s``'s), statistics recomputed from ``s``.

    The closed-form backward treats the saved statistics as constants, which is right for a first
    derivative but drops their dependence on ``s`` in a second one.
    """
    with torch.enable_grad():
        s_ = s if s.requires_grad else s.detach().requires_grad_()
        w_ = None if weight is None else weight if weight.requires_grad else weight.detach().requires_grad_()
        xf = s_.reshape(view).to(sd or s.dtype)
        if center:
            mean, var = moments(xf, dims)
            xhat = (xf - mean) * torch.rsqrt(var + eps)
        else:
            xhat = xf * torch.rsqrt(mean_square(xf, dims) + eps)
        y = xhat if w_ is None else xhat * w_.reshape(1, view[1], view[2], 1).to(xf.dtype)
        grads = torch.autograd.grad(
            y.to(s.dtype).reshape(s.shape), [s_] if w_ is None else [s_, w_], gy, create_graph=True
        )
    dx = grads[0] if gs is None else grads[0] + gs
    return dx, (grads[1].reshape(weight.shape) if w_ is not None else None)


def _seg_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, residual, weight, bias, n, c, length, groups, center, eps = inputs
    _, s, mean, _, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.cfg = (n, c, length, groups, center, eps, residual is not None, None if bias is None else bias.shape)


def _seg_backward(ctx, gy, gs, gmean, gvar, grstd):  # noqa: ANN001, ANN202
    s, weight, mean, rstd = ctx.saved_tensors
    n, c, length, groups, center, eps, has_r, bias_shape = ctx.cfg
    gs = gs if has_r else None
    want_w = weight is not None and ctx.needs_input_grad[2]
    want_b = bias_shape is not None and ctx.needs_input_grad[3]
    if torch.is_grad_enabled():  # create_graph=True
        if has_r:
            raise RuntimeError(
                "normkit::seg_norm with a residual (add_norm) does not support double backward (create_graph=True): "
                "it saves only x + residual; use the norm on x + residual computed outside"
            )
        view = (n // groups, groups, c, length)
        dx, dw = differentiable_backward(gy, gs, s, weight, view, (2, 3), center, eps)
        db = gy.reshape(view).sum((0, 3)).reshape(bias_shape) if want_b else None
        dw = dw if want_w else None
    else:
        dx, dw, db = torch.ops.normkit.seg_norm_backward(
            gy, gs, s, weight, mean, rstd, n, c, length, groups, center, want_w, want_b
        )
        dw = _maybe(dw).reshape(weight.shape) if want_w else None
        db = _maybe(db).reshape(bias_shape) if want_b else None
    dr = dx if has_r and ctx.needs_input_grad[1] else None
    return dx, dr, dw, db, None, None, None, None, None, None


seg_norm.register_autograd(_seg_backward, setup_context=_seg_setup)


# ---------------------------------------------------------------- channels-first (LayerNorm2d, RMSNorm2d)


@torch.library.custom_op("normkit::cf_norm", mutates_args=(), device_types="cpu")
def cf_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, n: int, c: int, length: int, center: bool, eps: float,
    y_nlc: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Channels-first ``(n, c, length)`` input normalized over c at every (n, l): ``(y, mean, var, rstd)``.
    y has x's shape, contiguous, or with ``y_nlc`` in ``(n, length, c)`` memory
    (:func:`normkit.kernels.cpu.nlc_empty`: timm's LayerNorm2d strides)."""
    y, _, mean, var, rstd = _cpu.cf_forward(x.contiguous(), weight, bias, n, c, length, center, eps, y_nlc=y_nlc)
    return y.view(x.shape), mean, var, rstd


@cf_norm.register_fake
def _(x, weight, bias, n, c, length, center, eps, y_nlc=False):  # noqa: ANN001, ANN202
    y = _cpu.nlc_empty(x, n, c, length) if y_nlc else x.new_empty(x.shape)  # the real op's strides
    return y, *(x.new_empty(n * length) for _ in range(3))


@torch.library.custom_op("normkit::cf_norm_backward", mutates_args=(), device_types="cpu")
def cf_norm_backward(
    g: Tensor, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    n: int, c: int, length: int, center: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂x, ∂w, ∂b)`` of :func:`cf_norm`; ∂w/∂b are empty unless asked for. ``g`` in ``(n, c, length)``
    or ``(n, length, c)`` memory is read in place (any other layout is copied); ∂x is contiguous."""
    dx, dw, db = _cpu.cf_backward(g, s, weight, mean, rstd, n, c, length, center, want_w, want_b)
    return dx.view(s.shape), (_empty(s) if dw is None else dw), (_empty(s) if db is None else db)


@cf_norm_backward.register_fake
def _(g, s, weight, mean, rstd, n, c, length, center, want_w, want_b):  # noqa: ANN001, ANN202
    return s.new_empty(s.shape), s.new_empty(c if want_w else 0), s.new_empty(c if want_b else 0)


def _cf_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, n, c, length, center, eps, _ = inputs
    _, mean, _, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.cfg = (n, c, length, center, eps, None if bias is None else bias.shape)


def _cf_backward(ctx, gy, gmean, gvar, grstd):  # noqa: ANN001, ANN202
    s, weight, mean, rstd = ctx.saved_tensors
    n, c, length, center, eps, bias_shape = ctx.cfg
    want_w = weight is not None and ctx.needs_input_grad[1]
    want_b = bias_shape is not None and ctx.needs_input_grad[2]
    if torch.is_grad_enabled():  # create_graph=True
        view = (n, 1, c, length)
        dx, dw = differentiable_backward(gy, None, s, weight, view, (2,), center, eps)
        db = gy.reshape(view).sum((0, 3)).reshape(bias_shape) if want_b else None
        dw = dw if want_w else None
    else:
        dx, dw, db = torch.ops.normkit.cf_norm_backward(gy, s, weight, mean, rstd, n, c, length, center, want_w, want_b)
        dw = _maybe(dw).reshape(weight.shape) if want_w else None
        db = _maybe(db).reshape(bias_shape) if want_b else None
    return dx, dw, db, None, None, None, None, None, None


cf_norm.register_autograd(_cf_backward, setup_context=_cf_setup)


# ---------------------------------------------------------------- DyT


@torch.library.custom_op("normkit::dyt", mutates_args=(), device_types="cpu")
def dyt(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    """``weight · tanh(alpha · x) + bias``, affine on the last (channels-last) or second dim."""
    return _cpu.dyt_forward(x.contiguous(), alpha, weight, bias, channels_last).view(x.shape)


@dyt.register_fake
def _(x, alpha, weight, bias, channels_last):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("normkit::dyt_backward", mutates_args=(), device_types="cpu")
def dyt_backward(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool, want_w: bool, want_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(∂x, ∂α, ∂w, ∂b)`` of :func:`dyt`; ∂w/∂b are empty unless asked for."""
    dx, da, dw, db = _cpu.dyt_backward(g, x.contiguous(), alpha, weight, channels_last, want_w, want_b)
    return dx.view(x.shape), da, (_empty(x) if dw is None else dw), (_empty(x) if db is None else db)


@dyt_backward.register_fake
def _(g, x, alpha, weight, channels_last, want_w, want_b):  # noqa: ANN001, ANN202
    c = x.shape[-1] if channels_last else x.shape[1]
    return torch.empty_like(x), torch.empty_like(alpha), x.new_empty(c if want_w else 0), x.new_empty(c if want_b else 0)

# dyt's autograd formula is registered in normkit.kernels.pointwise, beside the DyT math its
# double backward differentiates through (one statement of the closed form, not two).


# ---------------------------------------------------------------- EvoNorm-B0 / EvoNorm-S0
# Their autograd formulas are registered in normkit.functional.evonorm, beside the plain formulas
# their double backward differentiates through.


@torch.library.custom_op("normkit::evonorm_b0", mutates_args=(), device_types="cpu")
def evonorm_b0(
    x: Tensor, running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None, v: Tensor,
    training: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-B0 of ``(N, C, *spatial)`` ``x``: ``(y, var_b, mean_b, a, mean_i, std_i)`` — per channel the
    biased batch variance (eval: a copy of ``running_var``), batch mean and ``sqrt(var_b + eps)``, per
    (n, c) row (flat) the mean and ``sqrt(Var + eps)``. ``running_var`` is read in eval only."""
    return _cpu.evonorm_b0_forward(x.contiguous(), running_var, weight, bias, v, training, eps)


@evonorm_b0.register_fake
def _(x, running_var, weight, bias, v, training, eps):  # noqa: ANN001, ANN202
    n, c = x.shape[:2]
    return torch.empty_like(x), *(x.new_empty(c) for _ in range(3)), x.new_empty(n * c), x.new_empty(n * c)


@torch.library.custom_op("normkit::evonorm_b0_backward", mutates_args=(), device_types="cpu")
def evonorm_b0_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, v: Tensor, mean_i: Tensor, std_i: Tensor, mean_b: Tensor, a: Tensor,
    training: bool, want_w: bool, want_b: bool, want_v: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(∂x, ∂w, ∂b, ∂v)`` of :func:`evonorm_b0`; ∂w/∂b/∂v are empty unless asked for."""
    dx, dw, db, dv = _cpu.evonorm_b0_backward(g, x, weight, v, mean_i, std_i, mean_b, a, training, want_w, want_b, want_v)
    return dx.view(x.shape), *(_empty(x) if t is None else t for t in (dw, db, dv))


@evonorm_b0_backward.register_fake
def _(g, x, weight, v, mean_i, std_i, mean_b, a, training, want_w, want_b, want_v):  # noqa: ANN001, ANN202
    c = x.shape[1]
    return torch.empty_like(x), *(x.new_empty(c if want else 0) for want in (want_w, want_b, want_v))


@torch.library.custom_op("normkit::evonorm_s0", mutates_args=(), device_types="cpu")
def evonorm_s0(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, v: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """EvoNorm-S0 of ``(N, C, *spatial)`` ``x`` in ``groups`` groups: ``(y, mean, rstd)``, one statistic per (n, group)."""
    return _cpu.evonorm_s0_forward(x.contiguous(), weight, bias, v, groups, eps)


@evonorm_s0.register_fake
def _(x, weight, bias, v, groups, eps):  # noqa: ANN001, ANN202
    return torch.empty_like(x), x.new_empty(x.shape[0] * groups), x.new_empty(x.shape[0] * groups)


@torch.library.custom_op("normkit::evonorm_s0_backward", mutates_args=(), device_types="cpu")
def evonorm_s0_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, v: Tensor, mean: Tensor, rstd: Tensor, groups: int,
    want_w: bool, want_b: bool, want_v: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(∂x, ∂w, ∂b, ∂v)`` of :func:`evonorm_s0`; ∂w/∂b/∂v are empty unless asked for."""
    dx, dw, db, dv = _cpu.evonorm_s0_backward(g, x, weight, v, mean, rstd, groups, want_w, want_b, want_v)
    return dx.view(x.shape), *(_empty(x) if t is None else t for t in (dw, db, dv))


@evonorm_s0_backward.register_fake
def _(g, x, weight, v, mean, rstd, groups, want_w, want_b, want_v):  # noqa: ANN001, ANN202
    c = x.shape[1]
    return torch.empty_like(x), *(x.new_empty(c if want else 0) for want in (want_w, want_b, want_v))


# ---------------------------------------------------------------- Region Normalization (RN-B / RN-L)
# Its autograd formula is registered in normkit.functional.region_norm, beside the official formula
# its double backward differentiates through.


@torch.library.custom_op("normkit::region_norm", mutates_args=(), device_types="cpu")
def region_norm(
    x: Tensor, mask: Tensor, gc: Tensor, bc: Tensor, gmap: Tensor | None, bmap: Tensor | None,
    per_sample: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Region normalization of ``(N, C, *spatial)`` ``x`` under a binary ``(N, 1, *spatial)`` mask with
    per-(channel, region) tables ``gc``, ``bc`` ``(C, 2)`` and optional maps: ``(y, mu, rho)``, the
    statistics ``(N, C, 2)`` (per_sample) or ``(C, 2)``."""
    return _cpu.region_norm_forward(x.contiguous(), mask, gc, bc, gmap, bmap, per_sample, eps)


@region_norm.register_fake
def _(x, mask, gc, bc, gmap, bmap, per_sample, eps):  # noqa: ANN001, ANN202
    stats = (x.shape[0], x.shape[1], 2) if per_sample else (x.shape[1], 2)
    return torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)


@torch.library.custom_op("normkit::region_norm_backward", mutates_args=(), device_types="cpu")
def region_norm_backward(
    g: Tensor, x: Tensor, mask: Tensor, gc: Tensor, gmap: Tensor | None, mu: Tensor, rho: Tensor, per_sample: bool,
    want_x: bool, want_gc: bool, want_bc: bool, want_gmap: bool, want_bmap: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(∂x, ∂gc, ∂bc, ∂gmap, ∂bmap)`` of :func:`region_norm`; each is empty unless asked for."""
    wants = (want_x, want_gc, want_bc, want_gmap, want_bmap)
    got = _cpu.region_norm_backward(g, x, mask, gc, gmap, mu, rho, per_sample, wants)
    return tuple(_empty(x) if t is None else t for t in got)  # type: ignore[return-value]


@region_norm_backward.register_fake
def _(g, x, mask, gc, gmap, mu, rho, per_sample, want_x, want_gc, want_bc, want_gmap, want_bmap):  # noqa: ANN001, ANN202
    shapes = (x.shape, gc.shape, gc.shape, mask.shape, mask.shape)
    wants = (want_x, want_gc, want_bc, want_gmap, want_bmap)
    return tuple(x.new_empty(s) if w else x.new_empty(0) for s, w in zip(shapes, wants))


# ---------------------------------------------------------------- PowerNorm
# Its autograd formula (the approximate backward, which also updates the ema_gz buffer) is registered in
# normkit.functional.power_norm, beside the ATen statement its double backward differentiates.


@torch.library.custom_op("normkit::power_norm", mutates_args=(), device_types="cpu")
def power_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_phi: Tensor, iters: Tensor, ema_gz: Tensor,
    groups: int, warmup_iters: int, paper_exact: bool, eps: float, group_eps: float, alpha_bkw: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """PowerNorm's training forward of ``(N, C)`` token rows (``csrc/power_norm.cpp``): ``(y, rrow, stats)``,
    the GroupScaling factor per (row, group) (``groups`` 0: none, empty) and ``[inv_f, inv_bwd, Σ z², ψ²_B]``
    (C each). Reads ``running_phi`` and ``iters`` (updates neither); ``ema_gz`` and ``alpha_bkw`` are
    for the backward only."""
    return _cpu.power_norm_forward(
        x.contiguous(), weight, bias, running_phi, iters, groups, warmup_iters, paper_exact, eps, group_eps
    )


@power_norm.register_fake
def _(x, weight, bias, running_phi, iters, ema_gz, groups, warmup_iters, paper_exact, eps, group_eps, alpha_bkw):  # noqa: ANN001, ANN202
    return torch.empty_like(x), x.new_empty(x.shape[0] * groups), x.new_empty(4 * x.shape[1])


@torch.library.custom_op("normkit::power_norm_backward", mutates_args=(), device_types="cpu")
def power_norm_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, rrow: Tensor, stats: Tensor, ema_gz: Tensor, keep: float, groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂x, Σ_rows g·xs, Σ_rows g)`` of :func:`power_norm` with ``keep`` = 1 − α_bkw (reads ``ema_gz``)."""
    return _cpu.power_norm_backward(g, x.contiguous(), weight, rrow, stats, ema_gz, keep, groups)


@power_norm_backward.register_fake
def _(g, x, weight, rrow, stats, ema_gz, keep, groups):  # noqa: ANN001, ANN202
    return torch.empty_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


# ---------------------------------------------------------------- RepBN / PRepBN's mix (csrc/rep_batch_norm.cpp)
# The autograd formula of rep_batch_norm_mix is registered in normkit.functional.rep_batch_norm, beside the
# plain formulas its double backward differentiates through; the C-sized math below is shared with the
# eager autograd Function there.


def _vec(p: Tensor | None, c: int, fill: float) -> Tensor:
    """``p`` in float64, or ``c`` copies of ``fill`` (a missing weight is 1, a missing bias 0)."""
    return torch.full((c,), fill, dtype=torch.float64) if p is None else p.detach().reshape(-1).double()


def rep_mix_coefficients(
    x: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, bn_w: Tensor | None, bn_b: Tensor | None, alpha: Tensor,
    lam: float, var: Tensor, bn_eps: float, has_ln: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor, float]:
    """The per-channel factors of ``y = x̂_LN·w1 + (x − μ)·gb·r + x·sa + bb`` (λ·LN + (1 − λ)·RepBN, s = 1 − λ):
    ``(w1 = λ·γ_ln, gb = s·γ, r = (σ² + eps)^−½, gb·r, bb = λ·β_ln + s·β, sa = s·α)``, formed in float64 and
    stored in x's dtype (w1 None without LayerNorm)."""
    c, dt = x.shape[-1], x.dtype
    s = 1.0 - lam
    r = torch.rsqrt(var.double() + bn_eps)
    gb = s * _vec(bn_w, c, 1.0)
    bb = s * _vec(bn_b, c, 0.0)
    w1 = None
    if has_ln:
        w1 = (lam * _vec(ln_w, c, 1.0)).to(dt)
        bb = bb + lam * _vec(ln_b, c, 0.0)
    return w1, gb.to(dt), r.to(dt), (gb * r).to(dt), bb.to(dt), s * float(alpha)


def rep_mix_param_grads(
    sums: Tensor, lam: float, has_ln: bool, mu: Tensor, r: Tensor, params: tuple[Tensor | None, ...],
    needs: tuple[bool, ...], dt: torch.dtype,
) -> list[Tensor | None]:
    """``(∂γ_ln, ∂β_ln, ∂γ, ∂β, ∂α)`` from the backward kernel's float64 sums ``(S, P, Q)`` = per channel
    ``Σ ∂L/∂y``, ``Σ ∂L/∂y·(x − μ)·r``, ``Σ ∂L/∂y·x̂_LN``: ``λ·Q, λ·S, s·P, s·S, s·Σ_c (P/r + μ·S)``.
    ``params`` = (ln_w, ln_b, bn_w, bn_b, alpha); without LayerNorm (λ = 0) its parameters get 0."""
    sg, p, q = sums
    s = 1.0 - lam
    ln_w, ln_b, bn_w, bn_b, alpha = params

    def cast(t: Tensor, like: Tensor | None) -> Tensor:
        return t.to(dt if like is None else like.dtype)

    d_alpha = None
    if needs[4]:
        d_alpha = cast(s * (p / r.double() + mu.double() * sg).sum(), alpha).reshape(alpha.shape)
    return [
        ((cast(lam * q, ln_w) if has_ln else torch.zeros_like(ln_w)) if needs[0] else None),
        ((cast(lam * sg, ln_b) if has_ln else torch.zeros_like(ln_b)) if needs[1] else None),
        cast(s * p, bn_w) if needs[2] else None,
        cast(s * sg, bn_b) if needs[3] else None,
        d_alpha,
    ]


@torch.library.custom_op("normkit::rep_batch_norm_stats", mutates_args=(), device_types="cpu")
def rep_batch_norm_stats(x: Tensor, has_ln: bool, ln_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 over ``(R, C)`` tokens: ``(row_mean, row_rstd, col, ok)``, the per-row LayerNorm statistics
    (empty unless ``has_ln``), ``col`` = (batch mean, biased variance) ``(2, C)`` float64, and ``ok`` (float64
    0-dim) 1 where those one-read statistics are exact (finite, well-conditioned), else 0."""
    rm, rr, col, ok = _cpu.prepbn_stats(x.contiguous(), has_ln, ln_eps)
    rm, rr = (_empty(x) if t is None else t for t in (rm, rr))
    return rm, rr, col, torch.tensor(1.0 if ok else 0.0, dtype=torch.float64)


@rep_batch_norm_stats.register_fake
def _(x, has_ln, ln_eps):  # noqa: ANN001, ANN202
    rows = x.shape[0] if has_ln else 0
    f64 = torch.float64
    return x.new_empty(rows), x.new_empty(rows), x.new_empty((2, x.shape[1]), dtype=f64), x.new_empty((), dtype=f64)


@torch.library.custom_op("normkit::rep_batch_norm_mix", mutates_args=(), device_types="cpu")
def rep_batch_norm_mix(
    x: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, bn_w: Tensor | None, bn_b: Tensor | None, alpha: Tensor,
    lam: float, mean: Tensor, var: Tensor, row_mean: Tensor | None, row_rstd: Tensor | None,
    training: bool, ln_eps: float, bn_eps: float,
) -> Tensor:
    """``λ·LN(x) + (1 − λ)·(BN(x) + α·x)`` over ``(R, C)`` tokens given the statistics of
    :func:`rep_batch_norm_stats` (LayerNorm terms only with ``row_mean``; RepBN alone: λ = 0, no row
    statistics) or, in eval, the running ones. ``training``: ``mean``/``var`` are the batch's, which the
    registered backward differentiates through as BatchNorm's does. ``ln_eps``: the LayerNorm eps the row
    statistics were made with (for a double backward, which recomputes them)."""
    has_ln = row_mean is not None
    w1, _, r, rg, bb, sa = rep_mix_coefficients(x, ln_w, ln_b, bn_w, bn_b, alpha, lam, var, bn_eps, has_ln)
    return _cpu.prepbn_out(x.contiguous(), row_mean, row_rstd, w1, rg, mean.to(x.dtype), bb, sa)


@rep_batch_norm_mix.register_fake
def _(x, ln_w, ln_b, bn_w, bn_b, alpha, lam, mean, var, row_mean, row_rstd, training, ln_eps, bn_eps):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("normkit::rep_batch_norm_mix_backward", mutates_args=(), device_types="cpu")
def rep_batch_norm_mix_backward(
    g: Tensor, x: Tensor, ln_w: Tensor | None, bn_w: Tensor | None, alpha: Tensor, lam: float, mean: Tensor,
    var: Tensor, row_mean: Tensor | None, row_rstd: Tensor | None, training: bool, bn_eps: float,
) -> tuple[Tensor, Tensor]:
    """``(∂x, sums)`` of :func:`rep_batch_norm_mix`: ``sums`` (3, C) float64 as :func:`rep_mix_param_grads` takes."""
    has_ln = row_mean is not None
    w1, gb, r, _, _, sa = rep_mix_coefficients(x, ln_w, None, bn_w, None, alpha, lam, var, bn_eps, has_ln)
    dx, sums = _cpu.prepbn_backward(g, x.contiguous(), row_mean, row_rstd, w1, gb, mean.to(x.dtype), r, sa, training)
    return dx.view(x.shape), sums


@rep_batch_norm_mix_backward.register_fake
def _(g, x, ln_w, bn_w, alpha, lam, mean, var, row_mean, row_rstd, training, bn_eps):  # noqa: ANN001, ANN202
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64)
