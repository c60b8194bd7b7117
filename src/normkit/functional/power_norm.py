"""PowerNorm (Shen et al. 2020): running quadratic mean with an approximate backward.

Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in
Transformers", ICML 2020, arXiv:2003.07845. Official code: ``sIncerass/powernorm``,
``fairseq/modules/norms/mask_powernorm.py`` (``MaskPowerNorm``, ``PowerFunction``,
``GroupScaling1D``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from normkit._compat import MISSING, renamed_argument
from normkit.functional._core import check_eps, check_float, check_param, snapshot
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


def _affine_forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """Shared forward of the approximate-backward Functions: ``z = x·stats[:C]``, ``y = w·z + b``; saves (z, weight, stats)."""
    z = x * stats[: x.shape[-1]]
    y = z if weight is None else z * weight.to(z.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    ctx.save_for_backward(z, weight, stats)
    return y


def token_mean(t: Tensor, reducer: Reducer | None) -> Tensor:
    """``mean(t, 0)`` over the rows of a ``(rows, C)`` tensor — over every process's rows with a
    ``reducer`` (one collective of ``(Σ_rows t, rows)``): the backward statistic of PowerNorm / UN."""
    if reducer is None:
        return t.mean(0)
    total, rows = reduce_packed([t.sum(0), t.new_full((1,), t.shape[0])], reducer)
    return total / rows


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
    xg = x.reshape(*x.shape[:-1], num_groups, c // num_groups)
    ms = mean_square(xg, -1)
    return (xg.to(ms.dtype) * torch.rsqrt(ms + eps)).to(x.dtype).reshape(x.shape)


class _PowerNormFn(Function):
    """``y = w·x·inv_fwd + b`` with PowerNorm's approximate backward.

    ``stats`` = ``cat([inv_fwd, inv_bwd])`` (C each). The backward reads and updates the
    buffer ``ema_gz`` (kept on ctx, not saved, so two forwards before one backward work):
    ``ĝ = g − (1 − α_bkw)·ema_gz·z``, ``ema_gz += mean(ĝ·z)``, ``dx = ĝ·inv_bwd``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stats, ema_gz, alpha_bkw, reducer=None):  # type: ignore[override]
        ctx.ema_gz, ctx.alpha_bkw, ctx.reducer = ema_gz, alpha_bkw, reducer
        return _affine_forward(ctx, x, weight, bias, stats)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        z, weight, stats = ctx.saved_tensors
        ema_gz = ctx.ema_gz
        c = z.shape[-1]
        grad_y = grad_y.to(z.dtype)
        g = grad_y if weight is None else grad_y * weight.to(z.dtype)
        approx = g - (1.0 - ctx.alpha_bkw) * ema_gz.to(z.dtype) * z
        with torch.no_grad():
            ema_gz.add_(token_mean(approx * z, ctx.reducer).to(ema_gz.dtype))
        gx = approx * stats[c:]
        gw = (grad_y * z).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = grad_y.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None


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
    """
    what = "power_norm"
    num_groups = renamed_argument(num_groups, group_num, new="num_groups", old="group_num", where="power_norm()", default=1)
    eps, group_eps = check_eps(eps), check_eps(group_eps)
    c = _check_common(x, running_phi, "running_phi", weight, bias, pad_mask, what)
    alpha_fwd, alpha_bkw = _check_unit(alpha_fwd, "alpha_fwd"), _check_unit(alpha_bkw, "alpha_bkw")
    warmup_iters = _check_count(warmup_iters, "warmup_iters")
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
        var = mean_square(x2d.detach(), 0, mask=keep, reducer=reducer).reshape(c)
        phi = running_phi.to(sd)
        denom = torch.where(t <= warmup_iters, var, phi)
        inv_fwd = torch.rsqrt(denom + eps)
        stats = snapshot(inv_fwd, inv_fwd if paper_exact else torch.rsqrt(var + eps))
        tf = t.to(sd)
        phi = torch.where(t < warmup_iters, phi * (tf - 1) / tf + var / tf, phi)
        running_phi.copy_((alpha_fwd * phi + (1.0 - alpha_fwd) * var).to(running_phi.dtype))
        iters.copy_(t)
    y = _PowerNormFn.apply(x2d, weight, bias, stats, ema_gz, alpha_bkw, reducer)
    return y.reshape(x.shape).to(x.dtype)
