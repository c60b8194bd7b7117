"""PowerNorm (Shen et al. 2020): running quadratic mean with an approximate backward.

Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in
Transformers", ICML 2020, arXiv:2003.07845. Official code: ``sIncerass/powernorm``,
``fairseq/modules/norms/mask_powernorm.py`` (``MaskPowerNorm``, ``PowerFunction``,
``GroupScaling1D``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import Function

from normkit import backend as _backend
from normkit._compat import MISSING, renamed_argument
from normkit.functional._closed_form import _FAST_DTYPES, column_sums
from normkit.functional._core import check_eps, check_float, check_param, snapshot
from normkit.functional.normalize import normalize
from normkit.kernels import cpu as _cpu
from normkit.kernels import ops as _ops
from normkit.kernels.canonical import safe_rstd
from normkit.stats import Reducer, accumulation_dtype, mean_square
from normkit.sync import reduce_packed


def _check_tokens(x: Tensor, num_features: int | None, what: str) -> int:
    """Validate a channels-last ``(B, T, C)`` or ``(N, C)`` input and return C."""
    check_float(x)
    c = x.shape[-1] if x.dim() else 0
    if x.dim() not in (2, 3) or (num_features is not None and c != num_features):
        want = "C" if num_features is None else str(num_features)
        raise ValueError(f"{what} expects input (B, T, {want}) or (N, {want}), got {tuple(x.shape)}")
    return c


def _check_pad_mask(pad_mask: Tensor | None, x: Tensor, what: str) -> None:
    if pad_mask is None:
        return
    if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool:
        got = pad_mask.dtype if isinstance(pad_mask, Tensor) else type(pad_mask).__name__
        raise TypeError(f"{what}: pad_mask must be a bool tensor (True = padding), got {got}")
    if tuple(pad_mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{what}: pad_mask must have shape {tuple(x.shape[:-1])} (the input's shape without the channel dim, "
            f"True = padding), got {tuple(pad_mask.shape)}"
        )


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_buffer(buf: Tensor | None, shape: tuple[int, ...], name: str, what: str, *, integer: bool = False) -> Tensor:
    if buf is None:
        raise ValueError(f"{what} needs the state buffer {name} (all state buffers in training, the running statistic in eval)")
    if tuple(buf.shape) != shape or buf.is_floating_point() == integer:
        kind = "an integer" if integer else "a floating"
        raise ValueError(f"{what}: {name} must be {kind} tensor of shape {shape}, got {buf.dtype} {tuple(buf.shape)}")
    return buf


def _check_common(
    x: Tensor, running: Tensor, name: str, weight: Tensor | None, bias: Tensor | None, pad_mask: Tensor | None, what: str
) -> int:
    """The checks PowerNorm and UN share: tokens, the running statistic ``name``, pad_mask, weight, bias; returns C."""
    c = _check_tokens(x, running.numel() if isinstance(running, Tensor) else None, what)
    _check_buffer(running, (c,), name, what)
    _check_pad_mask(pad_mask, x, what)
    check_param(weight, c, "weight", what)
    check_param(bias, c, "bias", what)
    return c


def _eval_affine(xs: Tensor, running: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out: torch.dtype) -> Tensor:
    """Eval map ``weight · xs / sqrt(running + eps) + bias`` in ``xs``'s (accumulation) dtype, cast to ``out``."""
    scale = torch.rsqrt(running.to(xs.dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(xs.dtype)
    y = xs * scale if bias is None else torch.addcmul(bias.to(xs.dtype), xs, scale)
    return y.to(out)


def _affine_forward(  # type: ignore[no-untyped-def]
    ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor, saved: tuple, out: Tensor | None
) -> Tensor:
    """Shared forward of the approximate-backward Functions: ``y = x·(scale·w) + b`` per channel
    (one pass), saving ``saved`` (the input and C-sized statistics; elementwise terms are recomputed).
    ``out``: a scratch tensor of x's shape this call may write y into (see :func:`column_mean_square`)."""
    s = scale if weight is None else scale * weight.to(scale.dtype)
    if out is not None:
        ctx.mark_dirty(out)
        y = torch.mul(x, s, out=out) if bias is None else torch.addcmul(bias.to(x.dtype), x, s, out=out)
    else:
        y = x * s if bias is None else torch.addcmul(bias.to(x.dtype), x, s)
    ctx.save_for_backward(*saved)
    return y


def column_mean_square(x2d: Tensor, keep: Tensor | None, reducer: Reducer | None) -> tuple[Tensor, Tensor | None]:
    """``(mean_rows(x²) over the kept rows (C), scratch)`` for a ``(rows, C)`` input.

    Without a mask or reducer in eager float32/float64 code the sum of squares is one read of x
    (:func:`normkit.functional._closed_form.column_sums`, no input-sized temporary); otherwise
    :func:`normkit.stats.mean_square`. ``scratch`` (a tensor of x's shape the layer's output may be
    written into) is None on both paths: the squares are never materialized.
    """
    if keep is None and reducer is None and not torch.compiler.is_compiling() and x2d.dtype in _FAST_DTYPES:
        return column_sums(x2d, x2d)[0] / x2d.shape[0], None
    return mean_square(x2d, 0, mask=keep, reducer=reducer).reshape(x2d.shape[-1]), None


def _affine_backward(
    ctx, grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, gx_factor: Tensor,
    x_factor: Callable[[Tensor], Tensor], w_factor: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # type: ignore[no-untyped-def]
    """Shared backward of PowerNorm's and UN's approximate gradients, all of the form (per channel)::

        ∂L/∂x = ∂L/∂y · gx_factor − x · x_factor(Σ_rows ∂L/∂y · x)
        ∂L/∂w = w_factor · Σ_rows ∂L/∂y · x,      ∂L/∂b = Σ_rows ∂L/∂y

    ``x_factor`` receives the column sums (the layers' gradient statistics — ``mean(ĝ·z)`` — are
    C-sized functions of them) and may update the layer's buffers. Three passes, one input-sized
    allocation (∂L/∂x): both column sums in one read of ∂L/∂y and x (:func:`column_sums`; no
    product written and read back), then ``∂L/∂y · gx_factor`` and ``− x · x_factor`` added in place.
    """
    grad_y = grad_y.to(x.dtype)
    if grad_y.dtype in _FAST_DTYPES and not torch.compiler.is_compiling():
        gyx, gsum = column_sums(grad_y, x)
    else:
        gyx, gsum = torch.mul(grad_y, x).sum(0), grad_y.sum(0)
    gb = gsum.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    gw = (w_factor * gyx).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    xf = x_factor(gyx)
    gx = torch.mul(grad_y, gx_factor).addcmul_(x, xf, value=-1.0)
    return gx, gw, gb


def token_sum_mean(total: Tensor, rows: int, reducer: Reducer | None) -> Tensor:
    """``total / rows`` for a per-channel sum over ``rows`` tokens — over every process's tokens with a
    ``reducer`` (one collective of ``(Σ, rows)``): the backward statistic of PowerNorm / UN."""
    if reducer is None:
        return total / rows
    total, n = reduce_packed([total, total.new_full((1,), rows)], reducer)
    return total / n


def group_scaling(x: Tensor, num_groups: int = MISSING, eps: float = 1e-5, *, group_num: int = MISSING) -> Tensor:
    """PowerNorm's ``GroupScaling1D``: per token, ``x / sqrt(mean_{group}(x²) + eps)``.

    The C channels of each token are split into ``num_groups`` contiguous groups (official:
    ``group_num``, the number of attention heads); no affine. With ``num_groups=1`` this is an
    RMSNorm without weight. The mean square is accumulated in float32 for half inputs.
    ``group_num=`` is the old name of ``num_groups`` (accepted with a ``FutureWarning``).
    """
    num_groups = renamed_argument(num_groups, group_num, new="num_groups", old="group_num", where="group_scaling()")
    c = x.shape[-1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of the {c} channels")
    # the statistics engine's RMS over each group (one pass; closed-form exact backward that saves x and
    # one number per token-group; its statistics stay right where x² overflows float32)
    xg = x.reshape(*x.shape[:-1], num_groups, c // num_groups)
    return normalize(xg, -1, center=False, eps=eps).reshape(x.shape)


class _PowerNormFn(Function):
    """``y = w·x·inv_fwd + b`` with PowerNorm's approximate backward; saves x and the C-sized stats.

    ``stats`` = ``cat([inv_fwd, inv_bwd, inv_fwd²·Σ_rows x²])`` (C each). The backward reads and updates the
    buffer ``ema_gz`` (kept on ctx, not saved, so two forwards before one backward work):
    ``ĝ = g − (1 − α_bkw)·ema_gz·z``, ``ema_gz += mean(ĝ·z)``, ``dx = ĝ·inv_bwd`` with z = x·inv_fwd,
    g = ∂L/∂y·w. Per channel with k = (1 − α_bkw)·ema_gz and S = Σ_rows ∂L/∂y·x this is
    ``dx = ∂L/∂y·(w·inv_bwd) − x·(k·inv_fwd·inv_bwd)``, ``mean(ĝ·z) = (w·inv_fwd·S − k·inv_fwd²·Σx²)/rows``
    (``inv_fwd²·Σx²`` over all local rows, padded ones included, from the forward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stats, ema_gz, alpha_bkw, reducer=None, out=None):  # type: ignore[override]
        ctx.ema_gz, ctx.alpha_bkw, ctx.reducer = ema_gz, alpha_bkw, reducer
        c = x.shape[-1]
        return _affine_forward(ctx, x, weight, bias, stats[:c], (x, weight, bias, stats), out)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, stats = ctx.saved_tensors
        ema_gz, c = ctx.ema_gz, x.shape[-1]
        inv_f, inv_b, gam = stats[:c], stats[c : 2 * c], stats[2 * c :]
        w = torch.ones_like(inv_f) if weight is None else weight.to(x.dtype)
        k = (1.0 - ctx.alpha_bkw) * ema_gz.to(x.dtype)

        def x_factor(gyx: Tensor) -> Tensor:
            with torch.no_grad():
                total = w * inv_f * gyx - k * gam
                ema_gz.add_(token_sum_mean(total, x.shape[0], ctx.reducer).to(ema_gz.dtype))
            return k * inv_f * inv_b

        gx, gw, gb = _affine_backward(ctx, grad_y, x, weight, bias, w * inv_b, x_factor, inv_f)
        return gx, gw, gb, None, None, None, None, None


def _update_running(
    running_phi: Tensor, iters: Tensor, var: Tensor, warmup_iters: int, alpha_fwd: float, sd: torch.dtype
) -> None:
    """One step of the state machine after ψ²_B = ``var`` is known: ``iters`` += 1 (t is the new value),
    ``running_phi`` ← its cumulative mean while t < warmup, then the EMA with ``alpha_fwd`` (in place)."""
    t = iters + 1
    phi = running_phi.to(sd)
    tf = t.to(sd)
    phi = torch.where(t < warmup_iters, phi * (tf - 1) / tf + var / tf, phi)
    running_phi.copy_((alpha_fwd * phi + (1.0 - alpha_fwd) * var).to(running_phi.dtype))
    iters.copy_(t)


def _kernel_route(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, iters: Tensor | None, pad_mask: Tensor | None,
    reducer: Reducer | None, stats_dtype: torch.dtype | None,
) -> bool:
    """Whether a training call runs on ``csrc/power_norm.cpp`` (:class:`_PowerNormKernelFn`): eager,
    backend ``"auto"`` or ``"kernels"``, a contiguous float32/float64 CPU input the built kernels take
    with same-dtype parameters, and the plain configuration — no ``pad_mask``, no synchronization, no
    ``stats_dtype`` override, a long step counter; under ``torch.compile`` the same kernels run as the
    operator ``torch.ops.normkit.power_norm`` (an opaque graph node). Anything else keeps the ATen path."""
    if pad_mask is not None or reducer is not None:
        return False
    if _backend.get_backend() not in ("auto", "kernels") or stats_dtype not in (None, x.dtype):
        return False
    if not isinstance(iters, Tensor) or iters.dtype != torch.long or not _ops.accepts(x, weight, bias):
        return False
    _backend.note("power_norm", "kernels")  # for backend.record() (the `runs` column of `normkit kernels`)
    return True


class _PowerNormKernelFn(Function):
    """PowerNorm's training step on ``csrc/power_norm.cpp``: forward (GroupScaling, ψ-normalization,
    affine, and the running-statistic update) and the approximate backward with GroupScaling's exact
    one, the same math as the ATen path (:func:`group_scaling` + :class:`_PowerNormFn`).

    Saves the input ``(N, C)`` rows, one GroupScaling factor per (row, group) and 4·C statistics
    (``[inv_fwd, inv_bwd, Σ_rows z², ψ²_B]``); the GroupScaled input is recomputed in the backward.
    ``ema_gz`` is kept on ctx (read and updated by the backward, as :class:`_PowerNormFn`).
    A double backward (``create_graph=True``) differentiates the ATen statement of the same backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_phi, iters, ema_gz, cfg):  # type: ignore[override]
        groups, warmup_iters, paper_exact, eps, group_eps, alpha_fwd, alpha_bkw = cfg
        y, rrow, stats = _cpu.power_norm_forward(
            x, weight, bias, running_phi, iters, groups, warmup_iters, paper_exact, eps, group_eps
        )
        c = x.shape[-1]
        _update_running(running_phi, iters, stats[3 * c :], warmup_iters, alpha_fwd, x.dtype)
        ctx.ema_gz, ctx.cfg = ema_gz, (groups, group_eps, alpha_bkw)
        ctx.save_for_backward(x, weight, bias, rrow, stats)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        return *_kernel_grads(ctx, grad_y, _cpu.power_norm_backward), None, None, None, None


def _kernel_grads(ctx, grad_y: Tensor, kernel_bwd: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> tuple:  # type: ignore[no-untyped-def]
    """``(∂x, ∂w, ∂b)`` of the kernel forward, updating ``ctx.ema_gz``: ``kernel_bwd`` (the
    :mod:`normkit.kernels.cpu` wrapper in eager, the operator in a compiled graph) gives ∂x and the column
    sums ``S = Σ_rows ∂L/∂y·xs``, ``Σ_rows ∂L/∂y``; then ``∂w = inv_f·S`` and, as :class:`_PowerNormFn`,
    ``ema_gz += (w·inv_f·S − k·Σ z²)/rows`` with ``k = (1 − α_bkw)·ema_gz``. With grad mode on
    (``create_graph=True``) the same backward is stated in differentiable ATen ops instead."""
    x, weight, bias, rrow, stats = ctx.saved_tensors
    groups, group_eps, alpha_bkw = ctx.cfg
    ema_gz, (n, c) = ctx.ema_gz, x.shape
    inv_f, inv_b, gam = stats[:c], stats[c : 2 * c], stats[2 * c : 3 * c]
    w = torch.ones_like(inv_f) if weight is None else weight
    k = (1.0 - alpha_bkw) * ema_gz.to(x.dtype)
    grad_y = grad_y.to(x.dtype)
    if torch.is_grad_enabled():  # create_graph=True: the same backward as differentiable ATen ops
        xs = group_scaling(x, groups, group_eps) if groups else x
        gyx, gsum = (grad_y * xs).sum(0), grad_y.sum(0)
        dxs = grad_y * (w * inv_b) - xs * (k * inv_f * inv_b)
        if not ctx.needs_input_grad[0]:
            gx = None
        elif groups:
            (gx,) = torch.autograd.grad(xs, x, dxs, create_graph=True)
        else:
            gx = dxs
    else:
        gx, gyx, gsum = kernel_bwd(grad_y, x, weight, rrow, stats, ema_gz, 1.0 - alpha_bkw, groups)
    with torch.no_grad():
        ema_gz.add_(((w * inv_f * gyx.detach() - k * gam) / n).to(ema_gz.dtype))
    gw = inv_f * gyx if weight is not None and ctx.needs_input_grad[1] else None
    gb = gsum if bias is not None and ctx.needs_input_grad[2] else None
    return gx if ctx.needs_input_grad[0] else None, gw, gb


# torch.ops.normkit.power_norm (normkit.kernels.ops), the kernels as one node of a compiled graph: the
# same backward as _PowerNormKernelFn, with the backward operator
def _op_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias, _phi, _iters, ema_gz, groups, _warmup, _exact, _eps, group_eps, alpha_bkw = inputs
    _, rrow, stats = output
    ctx.ema_gz, ctx.cfg = ema_gz, (groups, group_eps, alpha_bkw)
    ctx.save_for_backward(x, weight, bias, rrow, stats)


def _op_backward(ctx, grad_y, _grrow, _gstats) -> tuple:  # type: ignore[no-untyped-def]
    return *_kernel_grads(ctx, grad_y, torch.ops.normkit.power_norm_backward), *(None,) * 9


_ops.power_norm.register_autograd(_op_backward, setup_context=_op_setup)


def power_norm(
    x: Tensor,
    running_phi: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    alpha_fwd: float = 0.9,
    eps: float = 1e-5,
    *,
    ema_gz: Tensor | None = None,
    iters: Tensor | None = None,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    num_groups: int | None = MISSING,
    group_eps: float = 1e-5,
    pad_mask: Tensor | None = None,
    paper_exact: bool = False,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    group_num: int | None = MISSING,
) -> Tensor:
    """Power Normalization of a channels-last ``(B, T, C)`` or ``(N, C)`` tensor.

    Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", 2020,
    arXiv:2003.07845. Per channel c, with the quadratic mean (no centring) over the tokens::

        x      ← GroupScaling(x)                       (official code, num_groups; None = off)
        ψ²_B   = mean_{non-padded tokens}(x²)
        z      = x / sqrt(ψ²_B + eps)        if t ≤ warmup_iters        (batch statistics)
               = x / sqrt(running_phi + eps) otherwise                   (ψ²_{t−1}, before the update)
        y      = weight · z + bias
        running_phi ← running_phi·(t−1)/t + ψ²_B/t   if t < warmup_iters (cumulative mean), then always
        running_phi ← alpha_fwd · running_phi + (1 − alpha_fwd) · ψ²_B

    Backward (approximate backpropagation, no gradient through ψ²_B)::

        g      = dL/dy · weight
        ĝ      = g − (1 − alpha_bkw) · ema_gz · z
        ema_gz ← ema_gz + mean_{all tokens}(ĝ · z)
        dL/dx  = ĝ / sqrt(ψ²_B + eps)        (paper_exact=True: divide by the forward's denominator)

    With ν = (1 − α_bkw)·ema_gz this is the paper's ν_t = ν_{t−1}(1 − (1 − α)Γ_t) + (1 − α)Λ_t,
    Γ = mean(z²), Λ = mean(g·z). Eval: ``y = weight · x / sqrt(running_phi + eps) + bias``
    (after GroupScaling), a per-channel affine map.

    Training is one step of the layer's state machine: ``iters`` (long, shape (1,)) advances
    by 1 (t is the new value), ``running_phi`` is updated in place, and the backward updates
    ``ema_gz`` in place. All three are required in training; eval needs ``running_phi`` only.

    Divergences between the paper and the official code (the code is the default):

    * GroupScaling1D (``num_groups``, default 1, the official ``group_num``; eps ``group_eps`` =
      1e-5) divides each token by the RMS of its channel group before PN; it is not in the paper.
      ``num_groups=None`` turns it off. ``group_num=`` is still accepted, with a ``FutureWarning``.
    * The backward divides by the current batch's ``sqrt(ψ²_B + eps)``; the paper divides by
      the running ψ_{t−1} used in the forward. ``paper_exact=True`` uses the forward's
      denominator (batch during warmup, running afterwards).
    * Warmup with batch statistics and the cumulative-mean running update are code-only.
    * ``pad_mask`` (True = padding, shape ``x.shape[:-1]``) removes padded tokens from ψ²_B,
      but, as in the official code, ``ema_gz``'s mean runs over all positions.

    ``reducer`` (synchronized statistics, :mod:`normkit.sync`): ψ²_B is the quadratic mean of every
    process's non-padded tokens (one collective of ``(n, Σx²)``) and the backward's ``mean(ĝ·z)``
    runs over every process's tokens (one collective), so ``running_phi``, ``ema_gz``, ``iters`` and
    the input gradients equal a single process's on the concatenated batch. GroupScaling is per token.

    Implementation: in training on a contiguous float32/float64 CPU input with no ``pad_mask``, no
    ``reducer`` and no ``stats_dtype`` override, backends ``"auto"`` and ``"kernels"`` run the step on
    ``kernels/csrc/power_norm.cpp`` (GroupScaling, statistics and output in two reads of x — one after
    warmup — and the backward in one read of x and ∂L/∂y; it saves x and O(N·G + C) statistics), as
    ``torch.ops.normkit.power_norm`` under ``torch.compile``. Everything else, and ``backend="eager"``,
    takes the ATen path (:func:`group_scaling` + :class:`_PowerNormFn`); both state the same equations.
    """
    what = "power_norm"
    num_groups = renamed_argument(num_groups, group_num, new="num_groups", old="group_num", where="power_norm()", default=1)
    eps, group_eps = check_eps(eps), check_eps(group_eps)
    c = _check_common(x, running_phi, "running_phi", weight, bias, pad_mask, what)
    alpha_fwd, alpha_bkw = _check_unit(alpha_fwd, "alpha_fwd"), _check_unit(alpha_bkw, "alpha_bkw")
    warmup_iters = _check_count(warmup_iters, "warmup_iters")
    if training and _kernel_route(x, weight, bias, iters, pad_mask, reducer, stats_dtype):
        ema_gz = _check_buffer(ema_gz, (c,), "ema_gz", what)
        iters = _check_buffer(iters, (1,), "iters", what, integer=True)
        groups = num_groups or 0
        if torch.compiler.is_compiling():
            y, _, stats = torch.ops.normkit.power_norm(
                x.reshape(-1, c), weight, bias, running_phi, iters, ema_gz, groups, warmup_iters, paper_exact, eps,
                group_eps, alpha_bkw,
            )
            with torch.no_grad():
                _update_running(running_phi, iters, stats[3 * c :], warmup_iters, alpha_fwd, x.dtype)
        else:
            cfg = (groups, warmup_iters, paper_exact, eps, group_eps, alpha_fwd, alpha_bkw)
            y = _PowerNormKernelFn.apply(x.reshape(-1, c), weight, bias, running_phi, iters, ema_gz, cfg)
        return y.reshape(x.shape)
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xs = x.to(sd)
    if num_groups is not None:
        xs = group_scaling(xs, num_groups, group_eps)
    if not training:
        return _eval_affine(xs, running_phi, weight, bias, eps, x.dtype)
    ema_gz = _check_buffer(ema_gz, (c,), "ema_gz", what)
    iters = _check_buffer(iters, (1,), "iters", what, integer=True)
    x2d = xs.reshape(-1, c)
    with torch.no_grad():
        t = iters + 1
        keep = None if pad_mask is None else (~pad_mask).reshape(-1, 1)
        xd = x2d.detach()
        var, scratch = column_mean_square(xd, keep, reducer)
        # 1/sqrt(ψ²_B + eps), right also where ψ²_B overflowed (no GroupScaling and |x| past ~1e19 in float32)
        inv_b = safe_rstd(xd, (0,), var.reshape(1, c), eps, mask=keep, reducer=reducer).reshape(c)
        phi = running_phi.to(sd)
        inv_fwd = torch.where(t <= warmup_iters, inv_b, torch.rsqrt(phi + eps))
        # inv_fwd²·Σ_rows x² over every local row (the backward's mean(ĝ·z) runs over padded rows too)
        if keep is None and reducer is None:
            n = x2d.shape[0]
            # where ψ²_B overflowed (inf) state it through inv_b = 1/sqrt(ψ² + eps), which safe_rstd keeps
            # right: inv_fwd²·ψ² = (inv_fwd/inv_b)²·(1 − eps·inv_b²) (no cancellation: there ψ² ≫ eps);
            # inv_fwd²·inf would be inf, or NaN once inv_fwd² underflows, and poison ema_gz
            gam = torch.where(
                torch.isinf(var), n * (inv_fwd / inv_b).square() * (1 - eps * inv_b.square()), inv_fwd.square() * (var * n)
            )
        else:
            gam = inv_fwd.square() * xd.square().sum(0)
        stats = snapshot(inv_fwd, inv_fwd if paper_exact else inv_b, gam)
        _update_running(running_phi, iters, var, warmup_iters, alpha_fwd, sd)
    y = _PowerNormFn.apply(x2d, weight, bias, stats, ema_gz, alpha_bkw, reducer, scratch)
    return y.reshape(x.shape).to(x.dtype)
