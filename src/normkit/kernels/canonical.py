"""One kernel for every statistics norm, in a canonical 4-D view.

Every statistics-based norm is "normalize ``x`` over some axes, then a per-channel affine".
Viewing the input as ``(N, G, Cg, L)`` — batch, groups, channels per group, positions — with
the affine indexed by ``(G, Cg)`` covers them all with one choice of reduced axes:

==============  ==========================  =============
norm            view                        reduced axes
==============  ==========================  =============
LayerNorm/RMS   (rows, 1, features, 1)      (2,)
LayerNorm2d     (N, 1, C, H·W)              (2,)
GroupNorm       (N, G, C/G, H·W)            (2, 3)
InstanceNorm    (N, C, 1, H·W)              (2, 3)
BatchNorm       (N, C, 1, H·W)              (0, 2, 3)
==============  ==========================  =============

Forward (``center=True``; ``center=False`` is the RMS variant with μ = 0 and σ² = mean(x²))::

    μ, σ² = moments(x, R)          # the statistics engine
    r  = 1 / sqrt(σ² + eps)
    x̂  = (x − μ) · r
    y  = x̂ · w + b

Closed-form backward, with ĝ = ∂L/∂y · w and means over the reduced axes R::

    ∂L/∂x = r · (ĝ − mean_R(ĝ) − x̂ · mean_R(ĝ · x̂))        (drop mean_R(ĝ) when center=False)
    ∂L/∂w = Σ_{N,L} ∂L/∂y · x̂,     ∂L/∂b = Σ_{N,L} ∂L/∂y

The autograd function saves only the input and the statistics (O(rows) values): x̂ is
recomputed in backward instead of being stored. Under ``torch.compile`` the forward takes its
statistics from :func:`normkit.stats.fused_moments`, so the reductions and the output share one
loop over rows. With ``residual`` the kernel first forms ``s = x + residual`` and returns it
(pre-norm transformer blocks), so the sum is written once.

The two pure functions below are the whole math; the ``"eager"`` backend runs them as is and
the ``"inductor"`` backend runs them through ``torch.compile``. Under a compiler (``"inductor"``,
or any backend inside a user's ``torch.compile`` region) they take a compiler-friendly spelling of
the same formulas (:func:`normkit.stats.fused_moments`); the saved r is then computed from the
returned variance, which matches the one the output used to rounding. The ``"compiled"`` backend
runs the same formulas as normkit's C++ CPU kernels (:mod:`normkit.kernels.cpu`) for the layouts
they cover — rows (L = 1, reduced axis 2), channels-first (G = 1, reduced axis 2) and
GroupNorm/InstanceNorm segments (reduced axes 2, 3) — and as ``"inductor"`` otherwise (BatchNorm).

A second derivative (``create_graph=True``) goes through :func:`_differentiable_backward`, which
recomputes the statistics from the saved input with autograd recording.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.kernels import cpu as _cpu
from normkit.kernels import ops as _ops
from normkit.stats import Reducer, accumulation_dtype, fused_moments, reduced_moments, rescue_scale

Dims = tuple[int, ...]


def _row_blocks(n: int, max_blocks: int = 256) -> int:
    t = max_blocks
    while t > 1:
        if n % t == 0 and n // t >= 4:
            return t
        t //= 2
    return 1


def column_sum(t: Tensor, max_blocks: int = 256) -> Tensor:
    """Sum of a canonical ``(N, G, Cg, L)`` tensor over N and L, shaped ``(G, Cg)``.

    For row layouts (L = 1, N = many rows) the sum down the rows is split into blocks of rows
    first, so the compiled column pass runs in parallel over blocks with contiguous vector loads
    along the features instead of striding down every row per column chunk (7.3 → 5.4 ms for
    LayerNorm's backward at 8192×1024 on CPU). It is still a second pass over its inputs: Inductor
    does not fuse a reduction down the rows into the row loop that produces ∂L/∂x.
    ``max_blocks`` bounds the number of blocks (a power of two).
    """
    n = t.shape[0]
    blocks = _row_blocks(n, max_blocks) if t.shape[3] == 1 else 1
    if blocks > 1:
        return t.reshape(blocks, n // blocks, *t.shape[1:]).sum((1, 4)).sum(0)
    return t.sum((0, 3))


def _affine_view(p: Tensor | None, x: Tensor) -> Tensor | None:
    return None if p is None else p.reshape(1, x.shape[1], x.shape[2], 1)


def _forward_math(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    dims: Dims,
    center: bool,
    eps: float,
    stats_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    s = x if residual is None else x + residual
    sd = accumulation_dtype(s.dtype, stats_dtype)
    xf = s.to(sd)
    # under a compiler: the spelling that keeps reductions and output in one loop per row; the
    # channels-first RMS variant (reduction over a strided C) measured faster with the plain one
    fused = torch.compiler.is_compiling() and (center or xf.shape[3] == 1)
    fm = fused_moments(xf, dims, center=center, fused=fused)
    r = safe_rstd(xf, dims, fm.inner_var, eps, mean=fm.inner_mean)
    # the first op allocates (xf may alias the input); later ones may then work in place
    y = (xf - fm.inner_mean).mul_(r) if center else xf * r
    w, b = _affine_view(weight, xf), _affine_view(bias, xf)
    if w is not None:
        y = y.mul_(w.to(sd))
    if b is not None:
        y = y.add_(b.to(sd))
    mean = fm.mean if center else torch.zeros_like(fm.var)
    # eager code hands r on (the same value backward needs: one overflow check per call); under a
    # compiler returning it would split the fused loop (see _NormalizeFn.forward)
    return y.to(x.dtype), s, mean, fm.var, None if torch.compiler.is_compiling() else r


def _backward_math(
    gy: Tensor,
    gs: Tensor | None,
    s: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dims: Dims,
    center: bool,
    want_w: bool,
    want_b: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    sd = rstd.dtype
    g = gy.to(sd)
    xhat = (s.to(sd) - mean).mul_(rstd) if center else s.to(sd) * rstd
    w = _affine_view(weight, s)
    gw = g if w is None else g * w.to(sd)
    proj = (gw * xhat).mean(dims, keepdim=True)
    dx = torch.addcmul(gw, xhat, proj, value=-1.0)
    if center:
        dx = dx.sub_(gw.mean(dims, keepdim=True))
    dx = dx.mul_(rstd)
    if gs is not None:
        dx = dx.add_(gs.to(sd))
    dw = column_sum(g * xhat) if want_w else None
    db = column_sum(g) if want_b else None
    return dx.to(s.dtype), dw, db


def safe_rstd(
    x: Tensor, dims: Dims, var: Tensor, eps: float, *, mean: Tensor | None = None, mask: Tensor | None = None,
    reducer: Reducer | None = None,
) -> Tensor:
    """``1/sqrt(var + eps)`` that stays right where the variance overflowed the float range.

    A finite float32/bfloat16 input with |x − μ| past ~1.8e19 has a variance past FLT_MAX (3.4e38):
    the statistics engine then returns ``inf`` — its true value — and ``rsqrt(inf + eps) = 0``
    would zero the normalized output (a masked sum gives NaN instead: inf·0). Where ``var`` is not
    finite, r is recomputed from the input scaled
    by the power of two ``c = 2^−(max_exp/2 + 6)`` (2^−70 for float32, 2^−518 for float64)::

        r = c / sqrt(mean_R((c·x − c·μ)²))        (μ = 0 for RMS; eps ≪ var there and dropped)

    Scaling by a power of two is exact; for an overflowed row max|x − μ|·c lies in [2^−6, 2^59], so
    the scaled squares neither overflow nor lose the terms that matter (those that underflow are
    below 2^−149 of the largest). Rows whose variance is finite keep ``rsqrt(var + eps)`` bit for
    bit. NaN input gives a NaN rescue, so its rows stay NaN; ±inf input gives what IEEE arithmetic
    gives on the formula: a NaN row when centred (the mean is inf), r = 0 for RMS (x·0 = 0 and
    inf·0 = NaN, as ``torch.nn.functional.rms_norm``).

    Cost: eager code on CPU checks that ``var.sum()`` is finite (one op on O(rows) values and a read,
    ~3 µs measured on a loaded 2-core machine; ``isfinite(var).all()`` was 4× that) and computes the
    rescue only when it is not (a sum past FLT_MAX of finite variances takes the rescue too, which
    then changes nothing). Under a compiler, and on other devices (where the check would be a host
    synchronization), it is branch-free: ``where(isfinite(var), r, rescue)`` — one more reduction
    over the same rows (its cost under Inductor is not yet measured). ``mask`` (bool,
    the input's shape) restricts the rescue to the included positions, as the statistics; with a
    ``reducer`` (synchronized statistics) the rescue's sums are reduced too, in eager code only
    (the check on the global variance is the same on every process, so all run the extra
    collective or none do); under a compiler with a reducer r is returned as is.
    """
    compiling = torch.compiler.is_compiling()
    if compiling and reducer is not None:
        return torch.rsqrt(var + eps)  # a branch-free rescue would add a collective to every call
    if (not compiling and (var.device.type == "cpu" or reducer is not None)
            and math.isfinite(var.sum().item())):  # one op; var is global with a reducer: all processes agree
        return torch.rsqrt(var + eps)
    c = rescue_scale(var.dtype)  # max_exp: 128 for float32
    xs = x.to(var.dtype) * c
    if reducer is not None:
        vs = reduced_moments(xs, dims, center=mean is not None, mask=mask, reducer=reducer).var
    else:
        d = xs if mean is None else xs - mean * c
        if mask is None:
            vs = d.square().mean(dims, keepdim=True)
        else:
            w = mask.to(var.dtype)
            vs = torch.where(mask, d.square(), 0.0).sum(dims, keepdim=True) / w.sum(dims, keepdim=True)
    bad = ~torch.isfinite(var)
    # each branch sees 1 in the rows it does not serve (not an underflowed 0 or an inf): a zero
    # gradient times a finite derivative, never inf·0 = NaN, in the gradients through the statistics
    r = torch.rsqrt(torch.where(bad, 1.0, var) + eps)
    return torch.where(bad, torch.rsqrt(torch.where(bad, vs, 1.0)) * c, r)


CpuLayout = tuple[str, int, int, int, int]


def _cpu_layout(
    impl: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    dims: Dims, stats_dtype: torch.dtype | None, nlc_out: bool = False,
) -> CpuLayout | None:
    """``(kind, n, c, length, groups)`` for normkit's CPU kernels (:mod:`normkit.kernels.cpu`), or
    None where the ``"kernels"`` backend runs the eager math and ``"compiled"`` Inductor
    (BatchNorm's axes, a ``stats_dtype`` override, and whatever :func:`normkit.kernels.cpu.supports`
    turns down). Kinds: ``"seg"`` (segments, rows), ``"cf"`` (channels-first) and ``"cf_nlc"``
    (channels-first with ``nlc_out``: y written in ``(N, L, C)`` memory)."""
    if impl not in ("kernels", "compiled") or (stats_dtype is not None and stats_dtype != x.dtype):
        return None
    n, g, cg, length = x.shape
    if dims == (2, 3):  # GroupNorm / InstanceNorm: one segment per (sample, group)
        layout = ("seg", n * g, cg, length, g)
    elif dims == (2,) and g == 1 and length == 1:  # rows
        layout = ("seg", n, cg, 1, 1)
    elif dims == (2,) and g == 1 and residual is None:  # channels-first LayerNorm / RMSNorm
        layout = ("cf_nlc" if nlc_out else "cf", n, cg, length, 1)
    else:
        return None
    return layout if _ops.accepts(x, weight, bias, residual) else None


def _stats_shape(x: Tensor, dims: Dims) -> tuple[int, ...]:
    return tuple(1 if i in dims else x.shape[i] for i in range(4))


class _NormalizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, dims, center, eps, stats_dtype, impl, nlc_out):  # noqa: ANN001, ANN205
        key = (dims, center, eps, stats_dtype, x.dtype, weight is not None, bias is not None, residual is not None)
        layout = _cpu_layout(impl, x, weight, bias, residual, dims, stats_dtype, nlc_out)
        if layout is None and impl == "kernels":
            _backend.note("normalize", "eager")  # a layout (BatchNorm's axes) or input the kernels lack
        if layout is not None:
            kind, n, c, length, groups = layout
            shape = _stats_shape(x, dims)
            if kind == "seg":
                y, s, mean, var, rstd = _cpu.seg_forward(x, residual, weight, bias, n, c, length, groups, center, eps, shape)
            else:
                y, s, mean, var, rstd = _cpu.cf_forward(x, weight, bias, n, c, length, center, eps, shape, kind == "cf_nlc")
        else:
            y, s, mean, var, rstd = _backend.executor(impl, _forward_math, key)(
                x, weight, bias, residual, dims, center, eps, stats_dtype
            )
            if rstd is None:
                # r from the returned variance, outside the compiled forward (returning it from there
                # splits the fused loop; recomputing it inside backward's loops costs a scalar sqrt per element)
                rstd = safe_rstd(s, dims, var, eps, mean=mean if center else None)
        # without a residual the input itself is saved (not a copy or view made here), so a double
        # backward differentiates through the user's tensor
        ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
        ctx.cfg = (dims, center, impl, residual is not None, weight is not None, key, layout, eps,
                   None if bias is None else bias.shape)
        ctx.mark_non_differentiable(mean, var)
        if residual is None:
            return y, mean, var
        return y, s, mean, var

    @staticmethod
    def backward(ctx, gy, *rest):  # noqa: ANN001, ANN205
        s, weight, mean, rstd = ctx.saved_tensors
        dims, center, impl, has_r, has_w, key, layout, eps, bias_shape = ctx.cfg
        gs = rest[0] if has_r else None
        want_w, want_b = has_w and ctx.needs_input_grad[1], bias_shape is not None and ctx.needs_input_grad[2]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            if has_r:
                raise RuntimeError(
                    "add_norm does not support double backward (create_graph=True): it saves only x + residual; "
                    "use the norm on x + residual computed outside (e.g. F.layer_norm(x + residual, ...))"
                )
            dx, dw = _ops.differentiable_backward(
                gy, gs, s, weight if has_w else None, tuple(s.shape), dims, center, eps, rstd.dtype
            )
            db = column_sum(gy.to(rstd.dtype)) if want_b else None
            dw = dw if want_w else None
        elif layout is not None:
            kind, n, c, length, groups = layout
            w = weight if has_w else None
            if kind == "seg":
                dx, dw, db = _cpu.seg_backward(gy, gs, s, w, mean, rstd, n, c, length, groups, center, want_w, want_b)
            else:  # gy in (N, C, L) or (N, L, C) memory is read in place (the "cf_nlc" output's layout)
                dx, dw, db = _cpu.cf_backward(gy, s, w, mean, rstd, n, c, length, center, want_w, want_b)
            dx = dx.view(s.shape)
        else:
            key = (*key, gy.dtype, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
            dx, dw, db = _backend.executor(impl, _backward_math, key)(
                gy, gs, s, weight if has_w else None, mean, rstd, dims, center, want_w, want_b,
            )
        if dw is not None:
            dw = dw.reshape(weight.shape).to(weight.dtype)
        if db is not None:
            db = db.reshape(bias_shape).to(gy.dtype)
        dr = dx if has_r and ctx.needs_input_grad[3] else None
        return dx, dw, db, dr, None, None, None, None, None, None


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: Dims,
    *,
    center: bool = True,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
    nlc_out: bool = False,
) -> tuple[Tensor, ...]:
    """Normalize a canonical ``(N, G, Cg, L)`` tensor over ``dims``.

    Returns ``(y, mean, var)`` — or ``(y, x + residual, mean, var)`` with ``residual`` — where
    mean/var (biased, accumulation dtype, reduced axes kept) carry no gradient.

    ``nlc_out``: where the C++ kernels run the channels-first layout (G = 1, ``dims == (2,)``, no
    residual; ``"kernels"``/``"compiled"``, eager or as the ``cf_norm`` operator under
    ``torch.compile``), y's memory is ``(N, L, C)`` instead of x's: the layout timm's LayerNorm2d
    returns (channels-last strides once reshaped to ``(N, C, H, W)``), which the convolutions after
    it run in without a copy; the kernel writes it directly. The incoming gradient is read in either
    layout. Other layouts and paths ignore it (their y is laid out as x). LayerNorm2d/RMSNorm2d pass it.
    """
    if x.dim() != 4:
        raise ValueError(f"normalize expects the canonical 4-D (N, G, Cg, L) view, got {x.dim()}-D")
    impl = _backend.resolve(backend, x, "normalize")
    if impl == "triton":
        return _backend.triton_kernel("normalize")(
            x, weight, bias, dims, center=center, eps=eps, residual=residual, stats_dtype=stats_dtype
        )
    dims = tuple(dims)
    if impl == "kernels" and torch.compiler.is_compiling():
        layout = _cpu_layout(impl, x, weight, bias, residual, dims, stats_dtype, nlc_out)
        if layout is not None:
            return _operator(x, weight, bias, residual, dims, layout, center, float(eps))
    return _NormalizeFn.apply(x, weight, bias, residual, dims, center, float(eps), stats_dtype, impl, nlc_out)


def _operator(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, dims: Dims,
    layout: CpuLayout, center: bool, eps: float,
) -> tuple[Tensor, ...]:
    """The CPU kernels through their torch operators (:mod:`normkit.kernels.ops`), so a user's
    ``torch.compile`` graph keeps them; same outputs as :class:`_NormalizeFn`."""
    kind, n, c, length, groups = layout
    if kind == "seg":
        y, s, mean, var, _ = torch.ops.normkit.seg_norm(x, residual, weight, bias, n, c, length, groups, center, eps)
    else:
        y, mean, var, _ = torch.ops.normkit.cf_norm(x, weight, bias, n, c, length, center, eps, kind == "cf_nlc")
    shape = _stats_shape(x, dims)
    mean, var = mean.view(shape), var.view(shape)
    return (y, mean, var) if residual is None else (y, s, mean, var)
