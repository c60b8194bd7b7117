"""The Triton kernels as torch operators and as the ``"triton"`` backend's entry points.

Operators (``torch.library.custom_op``, with ``register_fake`` and ``register_autograd``), so
``torch.compile(model, fullgraph=True)`` keeps them as nodes and ``torch.export`` records them:

==============================  ==========================================================
operator                        computes
==============================  ==========================================================
``normkit::triton_norm``        canonical-view LayerNorm/RMSNorm/GroupNorm (optional residual):
                                ``(y, s, mean, var, rstd)``
``normkit::triton_norm_backward``  ``(∂x, ∂w, ∂b)`` from the saved input (or sum) and statistics
``normkit::triton_dyt``         DyT forward
``normkit::triton_dyt_backward``   ``(∂x, ∂α, ∂w, ∂b)``
==============================  ==========================================================

Eager calls go to the same launchers through a :class:`torch.autograd.Function` (cheaper per call than
a ``custom_op`` dispatch, as for the CPU kernels in :mod:`normkit.kernels.ops`); under a compiler the
operators are used. Why ``custom_op`` rather than ``torch.library.triton_op``: the same registration
then serves CUDA tensors and, under ``TRITON_INTERPRET=1``, CPU tensors, and it is the mechanism the
CPU kernels use; the price is that Inductor treats the kernels as opaque (no fusion with neighbours).

Entry points registered with :func:`normkit.backend.register_triton_kernel`:
``normalize`` (the canonical engine; the layers ``layer_norm``, ``rms_norm``, ``add_norm``,
``layer_norm2d``, ``rms_norm2d``, ``group_norm`` and ``instance_norm`` reach the kernels through it)
and ``dyt``. They run the kernels where they apply — reduced axes ``(2,)`` (rows, per-head rows,
channels-first) or ``(2, 3)`` (segments), statistics in the accumulation dtype, input dtypes
float32/float64 (+ bfloat16/float16 on CUDA) — and otherwise the eager math (recorded as
``("normalize", "eager")`` by :func:`normkit.backend.record`), e.g. BatchNorm's axes or a
``stats_dtype`` override.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.kernels import canonical as _canonical
from normkit.kernels import ops as _cpu_ops
from normkit.kernels import pointwise as _pointwise
from normkit.kernels.triton import launch
from normkit.stats import accumulation_dtype

_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INTERPRETER_DTYPES = (torch.float32, torch.float64)  # the interpreter runs on numpy: no bfloat16


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _maybe(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


# ---------------------------------------------------------------- the statistics norms


@torch.library.custom_op("normkit::triton_norm", mutates_args=())
def triton_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, seg: bool, center: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize a canonical ``(N, G, Cg, L)`` tensor over Cg (``seg``: over Cg and L): ``(y, s, mean, var, rstd)``,
    ``s = x + residual`` (empty without a residual)."""
    y, s, mean, var, rstd = launch.norm_forward(
        x.contiguous(), None if residual is None else residual.contiguous(), weight, bias, seg, center, eps
    )
    return y, (_empty(x) if s is None else s), mean, var, rstd


@triton_norm.register_fake
def _(x, residual, weight, bias, seg, center, eps):  # noqa: ANN001, ANN202
    n, g, _, length = x.shape
    shape = (n, g, 1, 1) if seg else (n, g, 1, length)
    acc = accumulation_dtype(x.dtype)
    stats = [x.new_empty(shape, dtype=acc) for _ in range(3)]
    return torch.empty_like(x), (_empty(x) if residual is None else torch.empty_like(x)), *stats


@torch.library.custom_op("normkit::triton_norm_backward", mutates_args=())
def triton_norm_backward(
    gy: Tensor, gs: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    seg: bool, center: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂x, ∂w, ∂b)`` of :func:`triton_norm`; ∂w/∂b flat, empty unless asked for."""
    dx, dw, db = launch.norm_backward(gy, gs, s, weight, mean, rstd, seg, center, want_w, want_b)
    return dx, (_empty(mean) if dw is None else dw), (_empty(mean) if db is None else db)


@triton_norm_backward.register_fake
def _(gy, gs, s, weight, mean, rstd, seg, center, want_w, want_b):  # noqa: ANN001, ANN202
    k = s.shape[1] * s.shape[2]
    return torch.empty_like(s), mean.new_empty(k if want_w else 0), mean.new_empty(k if want_b else 0)


def _norm_grads(
    gy: Tensor, gs: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    seg: bool, center: bool, eps: float, has_r: bool, want_w: bool, bias_shape: torch.Size | None, want_b: bool,
    op: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward both wrappers share: the kernel, or for ``create_graph=True`` a differentiable restatement."""
    if torch.is_grad_enabled():  # double backward: autograd through the math, statistics recomputed
        if has_r:
            raise RuntimeError(
                "add_norm does not support double backward (create_graph=True): it saves only x + residual; "
                "use the norm on x + residual computed outside (e.g. F.layer_norm(x + residual, ...))"
            )
        dims = (2, 3) if seg else (2,)
        dx, dw = _cpu_ops.differentiable_backward(gy, gs, s, weight, tuple(s.shape), dims, center, eps, rstd.dtype)
        db = gy.to(rstd.dtype).sum((0, 3)).reshape(bias_shape) if want_b else None
        return dx, (dw if want_w else None), db
    if op:
        dx, dw, db = torch.ops.normkit.triton_norm_backward(gy, gs, s, weight, mean, rstd, seg, center, want_w, want_b)
        dw, db = (_maybe(dw) if want_w else None), (_maybe(db) if want_b else None)
    else:
        dx, dw, db = launch.norm_backward(gy, gs, s, weight, mean, rstd, seg, center, want_w, want_b)
    dw = None if dw is None else dw.reshape(weight.shape).to(weight.dtype)
    db = None if db is None else db.reshape(bias_shape).to(gy.dtype)
    return dx, dw, db


def _norm_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, residual, weight, bias, seg, center, eps = inputs
    _, s, mean, _, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.cfg = (seg, center, eps, residual is not None, None if bias is None else bias.shape)


def _norm_op_backward(ctx, gy, gs, gmean, gvar, grstd):  # noqa: ANN001, ANN202
    s, weight, mean, rstd = ctx.saved_tensors
    seg, center, eps, has_r, bias_shape = ctx.cfg
    want_w = weight is not None and ctx.needs_input_grad[2]
    want_b = bias_shape is not None and ctx.needs_input_grad[3]
    dx, dw, db = _norm_grads(
        gy, gs if has_r else None, s, weight, mean, rstd, seg, center, eps, has_r, want_w, bias_shape, want_b, True
    )
    return dx, (dx if has_r and ctx.needs_input_grad[1] else None), dw, db, None, None, None


triton_norm.register_autograd(_norm_op_backward, setup_context=_norm_setup)


class _NormFn(torch.autograd.Function):
    """Eager wrapper of the launchers (same math and saved tensors as the operator)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, seg, center, eps):  # noqa: ANN001, ANN205
        y, s, mean, var, rstd = launch.norm_forward(x, residual, weight, bias, seg, center, eps)
        ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
        ctx.cfg = (seg, center, eps, residual is not None, None if bias is None else bias.shape)
        ctx.mark_non_differentiable(mean, var)
        return (y, mean, var) if residual is None else (y, s, mean, var)

    @staticmethod
    def backward(ctx, gy, *rest):  # noqa: ANN001, ANN205
        s, weight, mean, rstd = ctx.saved_tensors
        seg, center, eps, has_r, bias_shape = ctx.cfg
        want_w = weight is not None and ctx.needs_input_grad[2]
        want_b = bias_shape is not None and ctx.needs_input_grad[3]
        gs = rest[0] if has_r else None
        dx, dw, db = _norm_grads(gy, gs, s, weight, mean, rstd, seg, center, eps, has_r, want_w, bias_shape, want_b, False)
        return dx, (dx if has_r and ctx.needs_input_grad[1] else None), dw, db, None, None, None


def runs_on(x: Tensor) -> bool:
    """Whether the kernels take ``x``: a CUDA tensor of a supported dtype, or under ``TRITON_INTERPRET=1``
    a float32/float64 CPU tensor."""
    if x.is_cuda and not launch.interpreting():
        return x.dtype in _CUDA_DTYPES
    return (x.is_cuda or x.is_cpu) and x.dtype in _INTERPRETER_DTYPES


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: tuple[int, ...], *,
    center: bool = True, eps: float = 1e-5, residual: Tensor | None = None, stats_dtype: torch.dtype | None = None,
) -> tuple[Tensor, ...]:
    """The ``"triton"`` backend of :func:`normkit.kernels.normalize`: same arguments and outputs
    (``(y, mean, var)``, or ``(y, x + residual, mean, var)``)."""
    dims = tuple(d % 4 for d in dims)
    seg = dims == (2, 3)
    if not (
        (seg or dims == (2,))
        and runs_on(x)
        and (stats_dtype is None or stats_dtype == accumulation_dtype(x.dtype))
        and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
    ):
        _backend.note("normalize", "eager")
        return _canonical.normalize(
            x, weight, bias, dims, center=center, eps=eps, residual=residual, stats_dtype=stats_dtype, backend="eager"
        )
    eps = float(eps)
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if torch.compiler.is_compiling():
        y, s, mean, var, _ = torch.ops.normkit.triton_norm(x, residual, w, b, seg, center, eps)
        return (y, mean, var) if residual is None else (y, s, mean, var)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    out = _NormFn.apply(x, residual, w, b, seg, center, eps)
    return out


# ---------------------------------------------------------------- DyT


@torch.library.custom_op("normkit::triton_dyt", mutates_args=())
def triton_dyt(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    """DyT ``w · tanh(α x) + b`` (affine over the last dim if ``channels_last``, else over dim 1)."""
    return launch.dyt_forward(x.contiguous(), alpha, weight, bias, channels_last)


@triton_dyt.register_fake
def _(x, alpha, weight, bias, channels_last):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("normkit::triton_dyt_backward", mutates_args=())
def triton_dyt_backward(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(∂x, ∂α, ∂w, ∂b)`` of :func:`triton_dyt` (flat sums; ∂w/∂b empty unless asked for)."""
    dx, da, dw, db = launch.dyt_backward(g, x.contiguous(), alpha, weight, channels_last, want_w, want_b)
    return dx, da, (_empty(da) if dw is None else dw), (_empty(da) if db is None else db)


@triton_dyt_backward.register_fake
def _(g, x, alpha, weight, channels_last, want_w, want_b):  # noqa: ANN001, ANN202
    c = x.shape[-1] if channels_last else x.shape[1]
    acc = accumulation_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(1, dtype=acc), x.new_empty(c if want_w else 0, dtype=acc),
            x.new_empty(c if want_b else 0, dtype=acc))


def _dyt_grads(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool,
    w_shape: torch.Size | None, b_shape: torch.Size | None, needs: tuple[bool, ...], op: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    if torch.is_grad_enabled():  # double backward: the eager math, differentiable in x, α and w
        dx, da, dw, db = _pointwise._dyt_backward(g, x, alpha, weight, channels_last, b_shape is not None)
    else:
        want_w, want_b = weight is not None and needs[2], b_shape is not None and needs[3]
        if op:
            dx, da, dw, db = torch.ops.normkit.triton_dyt_backward(g, x, alpha, weight, channels_last, want_w, want_b)
            dw, db = (dw if want_w else None), (db if want_b else None)
        else:
            dx, da, dw, db = launch.dyt_backward(g, x, alpha, weight, channels_last, want_w, want_b)
        da = da.reshape(alpha.shape).to(alpha.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(g.dtype)
    dw = None if dw is None else dw.reshape(w_shape)
    db = None if db is None else db.reshape(b_shape)
    return dx, da, dw, db


def _dyt_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, alpha, weight, bias, channels_last = inputs
    ctx.save_for_backward(x, alpha, weight)
    ctx.cfg = (channels_last, None if weight is None else weight.shape, None if bias is None else bias.shape)


def _dyt_op_backward(ctx, g):  # noqa: ANN001, ANN202
    x, alpha, weight = ctx.saved_tensors
    channels_last, w_shape, b_shape = ctx.cfg
    return (*_dyt_grads(g, x, alpha, weight, channels_last, w_shape, b_shape, ctx.needs_input_grad, True), None)


triton_dyt.register_autograd(_dyt_op_backward, setup_context=_dyt_setup)


class _DyTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last):  # noqa: ANN001, ANN205
        y = launch.dyt_forward(x, alpha, weight, bias, channels_last)
        _dyt_setup(ctx, (x, alpha, weight, bias, channels_last), y)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, alpha, weight = ctx.saved_tensors
        channels_last, w_shape, b_shape = ctx.cfg
        return (*_dyt_grads(g, x, alpha, weight, channels_last, w_shape, b_shape, ctx.needs_input_grad, False), None)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    """The ``"triton"`` backend of DyT (:func:`normkit.kernels.pointwise.dyt`); other inputs run the eager math."""
    if not runs_on(x) or alpha.numel() != 1 or x.dim() < (1 if channels_last else 2):
        _backend.note("dyt", "eager")
        return _pointwise.dyt(x, alpha, weight, bias, channels_last, "eager")
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if torch.compiler.is_compiling():
        y = torch.ops.normkit.triton_dyt(x, alpha, w, b, channels_last)
    else:
        y = _DyTFn.apply(x.contiguous(), alpha, w, b, channels_last)
    return y
