"""Unified Normalization (Yang et al. 2022): windowed x² statistics with smoothed gradients.

Yang, Zhang, Lan, Yang, Li, Tan, Xiao, Pu, "Unified Normalization for Accelerating and
Stabilizing Transformers", ACM MM 2022, arXiv:2208.01313. Official code:
``hikvision-research/Unified-Normalization``,
``image_classification/models/unified_normalization/unified_normalization.py`` (``UN1d``,
``UN2dFunction``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd import Function

from normkit.functional._core import check_eps, snapshot
from normkit.functional.power_norm import (
    _affine_backward,
    _affine_forward,
    _check_buffer,
    _check_common,
    _check_count,
    _check_unit,
    _eval_affine,
    column_mean_square,
    token_sum_mean,
)
from normkit.kernels.canonical import safe_rstd
from normkit.stats import Reducer, accumulation_dtype

#: Gradient-compensation ratio r is clamped to [1/R_MAX, R_MAX] (official constant).
R_MAX = 5.0


#: ``momentum`` above this is almost surely written for the official (old-value) meaning
_OLD_MEANING_THRESHOLD = 0.5


def resolve_momentum(momentum: float | None, decay: float | None, where: str) -> float:
    """UN's update factor in torch's convention (the weight of the *new* value) from either spelling.

    Until normkit 0.1, UN's ``momentum`` weighted the *old* value, as in the official code
    (default 0.9), the opposite of torch's and of every other ``momentum`` here; it now means
    what it means in torch (default 0.1, the same update). The official meaning is ``decay``
    (= 1 − momentum). Both at once is a ``TypeError``. A ``momentum`` above 0.5 (a fast-moving
    running statistic in torch's convention, but the typical *old*-meaning value) is taken in the
    new meaning with a ``FutureWarning``, since code written before the change meant ``decay``.
    """
    if momentum is not None and decay is not None:
        raise TypeError(f"{where} got both momentum={momentum!r} and decay={decay!r}; decay = 1 − momentum, pass one")
    if decay is not None:
        return 1.0 - _check_unit(decay, "decay")
    if momentum is None:
        return 0.1
    momentum = _check_unit(momentum, "momentum")
    if momentum > _OLD_MEANING_THRESHOLD:
        warnings.warn(
            f"{where}: momentum={momentum} now weights the new value as in torch "
            f"(running_var ← (1 − momentum)·running_var + momentum·var); before, it weighted the old value. "
            f"For the old meaning pass decay={momentum} (= momentum={1.0 - momentum:.6g}).",
            FutureWarning,
            stacklevel=3,
        )
    return momentum


def _one_hot_rows(index: Tensor, rows: int) -> Tensor:
    """``(rows, 1)`` bool selecting row ``index`` (a 1-element integer tensor)."""
    return (torch.arange(rows, device=index.device) == index.reshape(())).unsqueeze(1)


def _geometric_mean(buf: Tensor) -> Tensor:
    return torch.exp(torch.log(buf).mean(0))


class _UnifiedNormFn(Function):
    """``y = w·x·inv + b`` with UN's gradient smoothing in the backward; saves x and the C-sized stats.

    ``stats`` = ``cat([inv (C), r (C), skip, window, slot_b])``: 1/sqrt(var+eps), the
    gradient-compensation ratio, the outlier/skip flag, whether the backward window mean is
    used, and the row of ``buffer_gz`` this step writes. ``ema_gz`` and ``buffer_gz`` are kept
    on ctx (read and updated at backward time, as in the official code). With z = x·inv,
    g = ∂L/∂y·w·r and S = Σ_rows ∂L/∂y·x, per channel: ``gz = mean(g·z) = w·r·inv·S/rows`` and
    ``dx = (g − k·z)·inv = ∂L/∂y·(w·r·inv) − x·(k·inv²)`` (k the smoothed statistic).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stats, ema_gz, buffer_gz, momentum, reducer=None, out=None):  # type: ignore[override]
        ctx.ema_gz, ctx.buffer_gz, ctx.momentum, ctx.reducer = ema_gz, buffer_gz, momentum, reducer
        c = x.shape[-1]
        return _affine_forward(ctx, x, weight, bias, stats[:c], (x, weight, bias, stats), out)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, stats = ctx.saved_tensors
        ema_gz, buffer_gz, m = ctx.ema_gz, ctx.buffer_gz, ctx.momentum
        c = x.shape[-1]
        inv, r = stats[:c], stats[c : 2 * c]
        skip, window, slot = stats[2 * c] > 0.5, stats[2 * c + 1] > 0.5, stats[2 * c + 2 :].long()
        wr = r if weight is None else weight.to(x.dtype) * r

        def x_factor(gyx: Tensor) -> Tensor:
            with torch.no_grad():
                gz = token_sum_mean(wr * inv * gyx, x.shape[0], ctx.reducer)
                ema_old = ema_gz.to(x.dtype)
                slot_row = _one_hot_rows(slot, buffer_gz.shape[0])
                buf = torch.where(slot_row, torch.where(skip, ema_old, gz), buffer_gz.to(x.dtype))
                mean_gz = torch.where(window, buf.mean(0), gz)
                ema_new = m * ema_old + (1.0 - m) * mean_gz
                buffer_gz.copy_(buf.to(buffer_gz.dtype))
                ema_gz.copy_(ema_new.to(ema_gz.dtype))
            return torch.where(skip, mean_gz, ema_new) * inv * inv

        gx, gw, gb = _affine_backward(ctx, grad_y, x, weight, bias, wr * inv, x_factor, r * inv)
        return gx, gw, gb, None, None, None, None, None, None


def unified_norm(
    x: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = None,
    eps: float = 1e-5,
    *,
    decay: float | None = None,
    ema_gz: Tensor | None = None,
    iters: Tensor | None = None,
    buffer_x2: Tensor | None = None,
    buffer_gz: Tensor | None = None,
    skip_counter: Tensor | None = None,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    compensation_iters: int = 1000,
    pad_mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
) -> Tensor:
    """Unified Normalization of a channels-last ``(B, T, C)`` or ``(N, C)`` tensor.

    Yang et al., "Unified Normalization for Accelerating and Stabilizing Transformers", 2022,
    arXiv:2208.01313. Per channel, with t the step (``iters`` after this call's increment),
    W_f / W_b the rows of ``buffer_x2`` / ``buffer_gz`` and m = 1 − ``momentum`` = ``decay``::

        x2    = mean_{non-padded tokens}(x²)                       (no centring)
        s²    = var(sqrt(buffer_x2))          one unbiased scalar over all W_f·C entries, before insertion
        buffer_x2[t mod W_f] ← x2
        outlier (only if outlier_filtration and t ≥ warmup_iters):
              any_c( AM_window(buffer_x2) − GM_window(buffer_x2) > s² · W_f )
              → buffer_x2[t mod W_f] ← running_var, skip_counter += 1
        skip  = outlier or W_f ≤ 1
        var   = x2                     if t ≤ W_f or t < warmup_iters or skip
              = GM_window(buffer_x2)   otherwise          (fluctuation smoothing: geometric mean)
        r     = clamp(sqrt(var+eps)/sqrt(running_var+eps), 1/5, 5); r = 1 if t ≤ max(compensation_iters, warmup_iters) or skip
        z     = x / sqrt(var + eps);   y = weight · z + bias
        running_var ← m · running_var + (1 − m) · var

    Backward (gradient smoothing; no gradient through the statistics)::

        g        = dL/dy · weight · r
        gz       = mean_{all tokens}(g · z)
        buffer_gz[t mod W_b] ← ema_gz if skip else gz
        mean_gz  = gz if t ≤ W_b or t < warmup_iters or skip else mean_window(buffer_gz)
        ema_gz   ← m · ema_gz + (1 − m) · mean_gz
        dL/dx    = (g − (mean_gz if skip else ema_gz) · z) / sqrt(var + eps)
        dL/dweight = sum(dL/dy · r · z),  dL/dbias = sum(dL/dy)

    Eval: ``y = weight · x / sqrt(running_var + eps) + bias``, a per-channel affine map that
    folds into an adjacent linear layer.

    Training advances ``iters`` (long, shape (1,)) and updates ``running_var``, ``buffer_x2``
    and ``skip_counter`` in place; the backward updates ``ema_gz`` and ``buffer_gz``. All are
    required in training; eval needs ``running_var`` only.

    ``momentum`` follows torch (it weights the *new* value, default 0.1); ``decay`` is the
    official code's ``momentum`` (it weights the *old* value, official default 0.9), i.e.
    ``decay = 1 − momentum``; pass one or the other (see :func:`resolve_momentum`).

    This is the official code (defaults: decay 0.9 = momentum 0.1; warmup_iters 4000;
    outlier_filtration False, the NLP setting; True is the CV setting).
    Its constants are kept: the r clamp [1/5, 5] and the compensation start
    ``compensation_iters=1000`` (a keyword here). ``pad_mask`` (True = padding, shape
    ``x.shape[:-1]``) removes padded tokens from x2, but gz averages over all positions, as in
    the code. The counter counts training forward calls.

    ``reducer`` (synchronized statistics, :mod:`normkit.sync`): x2 is over every process's
    non-padded tokens and the backward's gz over every process's tokens (one collective each), so
    the windows, counters and running variance stay identical on all processes and equal a single
    process's on the concatenated batch.
    """
    what = "unified_norm"
    eps = check_eps(eps)
    c = _check_common(x, running_var, "running_var", weight, bias, pad_mask, what)
    m = 1.0 - resolve_momentum(momentum, decay, what)  # the official code's factor on the old value
    warmup_iters = _check_count(warmup_iters, "warmup_iters")
    compensation_iters = _check_count(compensation_iters, "compensation_iters")
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xs = x.to(sd)
    if not training:
        return _eval_affine(xs, running_var, weight, bias, eps, x.dtype)
    for buf, name in ((buffer_x2, "buffer_x2"), (buffer_gz, "buffer_gz")):
        if buf is None or buf.dim() != 2 or buf.shape[0] < 1 or buf.shape[1] != c or not buf.is_floating_point():
            got = None if buf is None else f"{buf.dtype} {tuple(buf.shape)}"
            raise ValueError(f"{what} in training mode needs {name}, a floating tensor of shape (window, {c}); got {got}")
    ema_gz = _check_buffer(ema_gz, (c,), "ema_gz", what)
    iters = _check_buffer(iters, (1,), "iters", what, integer=True)
    skip_counter = _check_buffer(skip_counter, (1,), "skip_counter", what, integer=True)
    assert buffer_x2 is not None and buffer_gz is not None
    wf, wb = buffer_x2.shape[0], buffer_gz.shape[0]
    x2d = xs.reshape(-1, c)
    with torch.no_grad():
        t = iters + 1
        keep = None if pad_mask is None else (~pad_mask).reshape(-1, 1)
        x2, scratch = column_mean_square(x2d.detach(), keep, reducer)
        old = buffer_x2.to(sd)
        rv = running_var.to(sd)
        slot_f = _one_hot_rows(t % wf, wf)
        buf = torch.where(slot_f, x2, old)
        if outlier_filtration:
            # unbiased variance of all W_f·C entries (torch.var); undefined (NaN) for one entry
            recorded = torch.var(old.sqrt()) if old.numel() > 1 else old.new_full((), float("nan"))
            am, gm = buf.mean(0), _geometric_mean(buf)
            outlier = (t >= warmup_iters) & ((am - gm) > recorded * wf).any()
            buf = torch.where(slot_f & outlier, rv, buf)
            skip_counter.add_(outlier.to(skip_counter.dtype))
        else:
            outlier = torch.zeros_like(t, dtype=torch.bool)
        skip = outlier | (wf <= 1)
        batch = (t <= wf) | (t < warmup_iters) | skip
        var = torch.where(batch, x2, _geometric_mean(buf))
        ratio = torch.clamp(torch.sqrt(var + eps) / torch.sqrt(rv + eps), 1.0 / R_MAX, R_MAX)
        r = torch.where((t <= max(compensation_iters, warmup_iters)) | skip, torch.ones_like(ratio), ratio)
        window = ~((t <= wb) | (t < warmup_iters) | skip)
        # the batch statistic's 1/sqrt may be finite where x2 overflowed (|x| past ~1e19 in float32)
        inv_x2 = safe_rstd(x2d.detach(), (0,), x2.reshape(1, c), eps, mask=keep, reducer=reducer).reshape(c)
        inv = torch.where(batch, inv_x2, torch.rsqrt(var + eps))
        stats = snapshot(inv, r, skip.to(sd), window.to(sd), (t % wb).to(sd))
        running_var.copy_((m * rv + (1.0 - m) * var).to(running_var.dtype))
        buffer_x2.copy_(buf.to(buffer_x2.dtype))
        iters.copy_(t)
    y = _UnifiedNormFn.apply(x2d, weight, bias, stats, ema_gz, buffer_gz, m, reducer, scratch)
    return y.reshape(x.shape).to(x.dtype)
