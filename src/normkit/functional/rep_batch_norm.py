"""SLAB's re-parameterizable BatchNorm (RepBN) and the progressive LN → RepBN schedule (PRepBN).

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, arXiv:2405.11582. Official code:
``xinghaochen/SLAB`` (``classification/models/prepbn.py``: ``RepBN``, ``LinearNorm``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd import Function

from normkit import backend as _backend
from normkit.functional import aten as _aten
from normkit.functional._closed_form import column_sums
from normkit.functional._core import check_float
from normkit.functional._replay import replay_grads
from normkit.functional.batch_norm import batch_norm
from normkit.functional.layer_norm import layer_norm
from normkit.kernels import cpu as _cpu
from normkit.kernels import ops as _ops
from normkit.stats import Reducer, accumulation_dtype

_NATIVE_DTYPES = (torch.float32, torch.float64)


def _check_tokens(x: Tensor, c: int | None, what: str) -> int:
    check_float(x)
    if x.dim() < 2 or (c is not None and x.shape[-1] != c):
        want = "C" if c is None else str(c)
        raise ValueError(f"{what} expects a channels-last input (N, *, {want}) such as (B, T, {want}), got {tuple(x.shape)}")
    return x.shape[-1]


def token_mask(mask: Tensor, x: Tensor, what: str) -> Tensor:
    """A padding mask for channels-last ``x``: ``(N, *)`` (one flag per token) or broadcastable to ``x``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{what}: mask must be a bool tensor (True = real token), got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape == x.shape[:-1]:
        mask = mask.unsqueeze(-1)
    try:
        return mask.expand_as(x)
    except RuntimeError as e:
        raise ValueError(
            f"{what}: mask of shape {tuple(mask.shape)} must be {tuple(x.shape[:-1])} or broadcast to the input "
            f"shape {tuple(x.shape)}"
        ) from e


def _rep_math(
    x2d: Tensor, weight: Tensor | None, bias: Tensor | None, alpha: Tensor, rm: Tensor | None, rv: Tensor | None,
    training: bool, eps: float,
) -> Tensor:
    """The plain formula ``BN(x) + α·x`` on ``(rows, C)`` (no running-statistics update): the
    differentiable restatement :class:`_RepBNFn` replays for a double backward or after an overflow."""
    stats = (None, None) if training else (rm, rv)
    y = batch_norm(x2d, *stats, weight, bias, training, 0.0, eps, backend="eager")
    return y + alpha.to(x2d.dtype) * x2d


class _RepBNFn(Function):
    """``BN(x) + α·x`` on a contiguous ``(rows, C)`` input given its per-channel statistics, in one node.

    With μ, σ² (the batch's in training, the running ones in eval) and r = (σ² + eps)^−½ the
    layer is the per-channel affine ``y = x·a + c``, ``a = γ·r + α``, ``c = β − γ·r·μ`` (one pass).
    Backward, with S_g = Σ_rows ∂L/∂y, D = Σ_rows ∂L/∂y·(x − μ) (one read of ∂L/∂y and x:
    :func:`~normkit.functional._closed_form.column_sums`) and P = r·D, n rows::

        ∂L/∂x = ∂L/∂y·a − x·(γ·r²·P/n) + γ·r·(r·μ·P − S_g)/n      (the last two terms in training only)
        ∂L/∂γ = P,  ∂L/∂β = S_g,  ∂L/∂α = Σ ∂L/∂y·x = Σ_c (D + μ·S_g)   (C-sized, no second read)

    ∂L/∂x is two passes (``addcmul`` of the constant and ∂L/∂y·a, then ``− x·k`` in place). One
    input-sized allocation each way; saves the input and C-sized statistics. A double backward
    replays autograd on :func:`_rep_math`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, mean, var, training, eps):  # type: ignore[override]
        r = torch.rsqrt(var + eps)
        w = torch.ones_like(r) if weight is None else weight
        a = w * r + alpha
        c = -w * r * mean if bias is None else bias - w * r * mean
        ctx.cfg = (training, eps)
        ctx.save_for_backward(x, weight, bias, alpha, mean, var, r)
        return torch.addcmul(c, x, a)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, bias, alpha, mean, var, r = ctx.saved_tensors
        training, eps = ctx.cfg
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: autograd through the plain formula
            stats = (None, None) if training else (mean, var)
            grads = replay_grads(
                lambda x, w, b, a: _rep_math(x, w, b, a, *stats, training, eps), (x, weight, bias, alpha), needs[:4], gy
            )
            return (*grads, None, None, None, None)
        gy = gy.contiguous()
        w = torch.ones_like(r) if weight is None else weight
        if not (training or needs[1] or needs[2] or needs[3]):  # eval, ∂L/∂x only: one pass
            return gy * (w * r + alpha), None, None, None, None, None, None, None
        d, s_g = column_sums(gy, x, mean)
        p = r * d
        dx = None
        if needs[0]:
            a = w * r + alpha
            if training:
                n = x.shape[0]
                dx = torch.addcmul(w * r * (r * mean * p - s_g) / n, gy, a).addcmul_(x, w * r * r * p / n, value=-1.0)
            else:
                dx = gy * a
        da = (d + mean * s_g).sum().reshape(alpha.shape) if needs[3] else None
        return dx, p if needs[1] else None, s_g if needs[2] else None, da, None, None, None, None


#: the batch statistics' one-read path is used where every channel has mean² ≤ this · variance
#: (below: E[x²] − μ² loses at most log2(1 + this) bits to cancellation; else ATen's Welford)
_WELL_CONDITIONED = 4.0


def _batch_stats(
    x2d: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor] | None:
    """Per-channel batch mean and biased variance of a contiguous ``(rows, C)`` input, updating the
    running statistics as torch's BN does (momentum weights the batch, running_var gets the unbiased
    variance).

    One read of x, no input-sized temporary: Σx and Σx² from
    :func:`~normkit.functional._closed_form.column_sums`, ``var = Σx²/n − μ²``. That formula cancels
    where |μ| ≫ σ, so it is kept only where every channel has ``μ² ≤ 4·var`` (its relative error at
    most 5× a float sum's); otherwise ATen's ``batch_norm_update_stats`` (Welford, exact, 2-3× the
    time at 8192×1024). None, with the running statistics as before, where a channel's variance
    overflows float (CPU: one host read, shared with the conditioning check), for the caller's
    overflow-safe path.
    """
    check = x2d.is_cpu
    n = x2d.shape[0]
    with torch.no_grad():
        if check:  # elsewhere the check would be a host synchronization: Welford always
            sq, total = column_sums(x2d, x2d)
            mean = total / n
            var = sq / n - mean * mean
        if not (check and bool((torch.isfinite(var) & (var * _WELL_CONDITIONED >= mean * mean)).all())):
            tracked = running_mean is not None and running_var is not None
            old = (running_mean.clone(), running_var.clone()) if check and tracked else None
            mean, var = torch.batch_norm_update_stats(x2d, running_mean, running_var, momentum)
            if check and not math.isfinite(var.sum().item()):
                if old is not None:
                    running_mean.copy_(old[0])
                    running_var.copy_(old[1])
                return None
            return mean, var
        var.clamp_(min=0.0)
        _update_running(running_mean, running_var, mean, var, n, momentum)
    return mean, var


@torch.no_grad()
def _update_running(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, n: int, momentum: float
) -> None:
    """torch's BatchNorm update: momentum weights the batch, running_var gets the unbiased variance."""
    if running_mean is not None:
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = var * (n / (n - 1)) if n > 1 else var
        running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _fast_ok(x: Tensor, params: tuple[Tensor | None, ...], mask: Tensor | None, reducer: Reducer | None,
             stats_dtype: torch.dtype | None, backend: str | None = None, *, resolve: bool = True) -> bool:
    """Whether :class:`_RepBNFn` (and, ``resolve=False``: :class:`_RepBNKernelFn`) computes this call exactly:
    what ATen's BN takes (no mask, no reducer, no statistics dtype override, untracked buffers),
    float32/float64 throughout, eager code; with ``resolve``, also the backend resolves to ATen's op."""
    if mask is not None or reducer is not None or (stats_dtype is not None and stats_dtype != x.dtype):
        return False
    if x.dtype not in _NATIVE_DTYPES or torch.compiler.is_compiling():
        return False
    if any(p is not None and p.dtype != x.dtype for p in params) or any(
        p is not None and p.requires_grad for p in params[3:]
    ):
        return False
    return not resolve or _backend.resolve(backend, x, "batch_norm", True) == "native"


def rep_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    alpha: Tensor,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """RepBN of a channels-last ``(N, *, C)`` tensor (e.g. ViT tokens ``(B, T, C)``).

    SLAB (Guo et al., ICML 2024, arXiv:2405.11582)::

        RepBN(x) = BN(x) + α · x

    ``BN`` is torch's BatchNorm over every position of the batch (``B·T`` values per channel;
    the official code transposes to ``(B, C, T)`` and calls ``BatchNorm1d``): training uses the
    batch mean and biased variance and updates the running buffers in place (``momentum``
    weights the new batch, running_var gets the unbiased variance); eval uses the running
    statistics. ``α`` is a learnable scalar (shape ``(1,)`` in the official code). In eval the
    whole map is the per-channel affine ``x · (γ/√(σ²+eps) + α) + (β − γμ/√(σ²+eps))``, which
    folds into the next linear layer (see :func:`normkit.nn.rep_batch_norm.fuse_rep_batch_norm`).

    ``mask`` (bool, ``(N, *)`` one flag per token, or broadcastable to ``x``; True = real token)
    keeps padded tokens out of the batch statistics;
    padded positions are still normalized with them (the official LLaMA variant instead leaves
    them at ``(1 + α)·x``; they carry no signal either way).

    Where ATen's BatchNorm computes the call exactly (no mask or reducer, float32/float64, eager)
    it runs as one autograd node: with backend ``"auto"``/``"kernels"`` and normkit's C++ kernels
    :class:`_RepBNKernelFn` (``csrc/rep_batch_norm.cpp``: one read of x for the batch statistics, one
    pass for the output; backward one read of ∂L/∂y and x for the sums, one pass for ∂L/∂x; Welford
    statistics where the one-read variance is ill-conditioned), else :class:`_RepBNFn` (statistics
    from :func:`_batch_stats`, the per-channel affine in one pass, closed-form backward); otherwise
    normkit's ``batch_norm`` on the ``(rows, C)`` view plus ``α·x``.
    """
    c = _check_tokens(x, None if running_mean is None else running_mean.numel(), "rep_batch_norm")
    if not isinstance(alpha, Tensor) or alpha.numel() != 1:
        raise ValueError(f"rep_batch_norm: alpha must be a one-element tensor, got {alpha!r}")
    # BN over a (rows, C) view: ATen's 2-D BatchNorm runs channels-last rows ~5x faster than the
    # (B, C, T) transpose of the official code (same statistics)
    x2d = x.reshape(-1, c)
    if training and x2d.shape[0] <= 1 and reducer is None:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x2d.shape)}")
    params = (weight, bias, alpha, running_mean, running_var)
    if (training or running_mean is not None) and _fast_ok(x, params, mask, reducer, stats_dtype, resolve=False):
        x2d = x2d.contiguous()
        if _kernels_take(x2d, backend, *params):  # the C++ kernels; Welford statistics where they decline
            stats = (
                (_kernel_stats(x2d, False, 0.0, running_mean, running_var, momentum)
                 or _batch_stats(x2d, running_mean, running_var, momentum))
                if training else (running_mean, running_var)
            )
            if stats is not None:
                return _RepBNKernelFn.apply(
                    x2d, None, None, weight, bias, alpha, 0.0, stats[0], stats[1], None, None, training, 0.0, eps
                ).view(x.shape)
        elif _backend.resolve(backend, x, "batch_norm", True) == "native":
            stats = _batch_stats(x2d, running_mean, running_var, momentum) if training else (running_mean, running_var)
            if stats is not None:
                return _RepBNFn.apply(x2d, weight, bias, alpha, *stats, training, eps).view(x.shape)
    y = batch_norm(
        x2d,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        mask=None if mask is None else token_mask(mask, x, "rep_batch_norm").reshape(-1, c),
        reducer=reducer,
        stats_dtype=stats_dtype,
        backend=backend,
    )
    return torch.addcmul(y, x2d, alpha.to(x.dtype)).view(x.shape)


def _prepbn_math(x2d, ln_w, ln_b, bn_w, bn_b, alpha, lam, ln_eps, bn_eps):  # type: ignore[no-untyped-def]
    """The plain mix ``λ·LN(x) + (1 − λ)·(BN(x) + α·x)`` (batch statistics; normkit's overflow-safe
    eager paths): what :class:`_PRepBNMixFn` replays for a double backward or an overflowed token."""
    ln = layer_norm(x2d, (x2d.shape[-1],), ln_w, ln_b, ln_eps, backend="eager")
    return lam * ln + (1 - lam) * _rep_math(x2d, bn_w, bn_b, alpha, None, None, True, bn_eps)


class _PRepBNMixFn(Function):
    """PRepBN's training mix ``λ·LN(x) + (1 − λ)·RepBN(x)`` on ``(rows, C)`` in one node (0 < λ < 1).

    With the batch statistics μ, σ² given (per channel), RepBN is the per-channel affine
    ``x·a + c`` with ``a = s·(γ·r + α)``, ``c = s·(β − γ·r·μ)``, r = (σ² + eps)^−½, s = 1 − λ, so::

        y = LN(x; λ·γ_ln, λ·β_ln + c) + x·a             (ATen's LayerNorm, then one in-place pass)

    Backward, with S_g = Σ_rows ∂L/∂y, D = Σ_rows ∂L/∂y·(x − μ) (one read:
    :func:`~normkit.functional._closed_form.column_sums`) and P = r·D = Σ_rows ∂L/∂y·x̂_BN, n rows::

        ∂L/∂x = LN'(∂L/∂y) + ∂L/∂y·a − x·(s·γ·r²·P/n) + s·γ·r·(r·μ·P − S_g)/n
        ∂L/∂γ_ln = λ·Σ ∂L/∂y·x̂_LN,  ∂L/∂β_ln = λ·S_g,  ∂L/∂γ = s·P,  ∂L/∂β = s·S_g,  ∂L/∂α = s·Σ_c (D + μ·S_g)

    Forward: one input-sized allocation (the output), as LayerNorm alone. Backward: RepBN's part of
    ∂L/∂x in two passes, then LayerNorm's backward adds it in its own pass (normkit's C++ row kernel,
    ``seg_backward`` with it as the residual gradient; 82 vs 120 ms for ATen's LayerNorm backward plus
    three in-place passes at 8192×1024 on 2 loaded cores; ATen's where the kernels are off). Saves x
    and O(rows + C) statistics. A token whose
    LayerNorm statistics overflow (|x| past ~1e19 in float32), and a double backward, replay
    autograd on :func:`_prepbn_math`.
    """

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, bn_w, bn_b, alpha, lam, mean, var, ln_eps, bn_eps):  # type: ignore[override]
        s = 1 - lam
        r = torch.rsqrt(var + bn_eps)
        w1, b1 = lam * ln_w, lam * ln_b + s * (bn_b - bn_w * r * mean)
        y, ln_mean, ln_rstd = torch.native_layer_norm(x, [x.shape[-1]], w1, b1, ln_eps)
        ctx.replay = x.is_cpu and not _aten.finite_stats(ln_rstd)
        if ctx.replay:
            y = _prepbn_math(x, ln_w, ln_b, bn_w, bn_b, alpha, lam, ln_eps, bn_eps)
        else:
            y.addcmul_(x, s * (bn_w * r + alpha))
        ctx.eps = (ln_eps, bn_eps)
        ctx.save_for_backward(x, ln_w, ln_b, bn_w, bn_b, alpha, lam, mean, r, ln_mean, ln_rstd, w1, b1)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, ln_w, ln_b, bn_w, bn_b, alpha, lam, mean, r, ln_mean, ln_rstd, w1, b1 = ctx.saved_tensors
        ln_eps, bn_eps = ctx.eps
        needs = ctx.needs_input_grad
        if ctx.replay or torch.is_grad_enabled():
            grads = replay_grads(
                lambda *t: _prepbn_math(*t, lam, ln_eps, bn_eps), (x, ln_w, ln_b, bn_w, bn_b, alpha), needs[:6], gy
            )
            return (*grads, *([None] * 5))
        gy = gy.contiguous()
        n, s = x.shape[0], 1 - lam
        d, s_g = column_sums(gy, x, mean)
        p = r * d
        sgr = s * bn_w * r
        # RepBN's part of ∂L/∂x in two passes (its constant rides on the first addcmul)
        rep_dx = torch.addcmul(sgr * (r * mean * p - s_g) / n, gy, s * (bn_w * r + alpha))
        rep_dx.addcmul_(x, sgr * r * p / n, value=-1.0)
        if _cpu.supports(x, w1):  # LayerNorm's backward plus rep_dx in one pass (the kernel's residual gradient)
            dx, dw1, _ = _cpu.seg_backward(
                gy, rep_dx, x, w1, ln_mean.reshape(-1), ln_rstd.reshape(-1), n, x.shape[-1], 1, 1, True, needs[1], False
            )
        else:
            dx, dw1, _ = torch.ops.aten.native_layer_norm_backward(
                gy, x, [x.shape[-1]], ln_mean, ln_rstd, w1, b1, [True, needs[1], False]
            )
            dx.add_(rep_dx)
        da = s * (d + mean * s_g).sum() if needs[5] else None
        return (
            dx,
            lam * dw1 if needs[1] else None,
            lam * s_g if needs[2] else None,
            s * p if needs[3] else None,
            s * s_g if needs[4] else None,
            None if da is None else da.reshape(alpha.shape),
            *([None] * 5),
        )


class _RepBNKernelFn(Function):
    """RepBN (``lam = 0``, no row statistics) or PRepBN's mix ``λ·LN(x) + (1 − λ)·RepBN(x)`` on a
    contiguous ``(rows, C)`` input in one node, as ``csrc/rep_batch_norm.cpp``'s kernels.

    Given the per-channel statistics μ, σ² (the batch's in training, the running ones in eval; float64)
    and, with LayerNorm, the per-row mean and rstd of pass 1, with s = 1 − λ, r = (σ² + eps)^−½::

        y = x̂_LN·(λ·γ_ln) + (x − μ)·(s·γ·r) + x·(s·α) + (λ·β_ln + s·β)        (one pass, one write)

    Backward (training: μ, σ² functions of x as in BatchNorm), with S = Σ_rows ∂L/∂y,
    P = Σ_rows ∂L/∂y·(x − μ)·r, Q = Σ_rows ∂L/∂y·x̂_LN from the kernel's first sweep (which also takes
    LayerNorm's per-row sums) and ∂L/∂x from its second::

        ∂L/∂γ_ln = λ·Q,  ∂L/∂β_ln = λ·S,  ∂L/∂γ = s·P,  ∂L/∂β = s·S,  ∂L/∂α = s·Σ_c (P/r + μ·S)

    (the C-sized factors and sums: :func:`normkit.kernels.ops.rep_mix_coefficients` /
    :func:`~normkit.kernels.ops.rep_mix_param_grads`, shared with the operator
    ``torch.ops.normkit.rep_batch_norm_mix``). Saves x and O(rows + C) statistics. A double backward
    (grad mode on in backward) replays autograd on the plain formula (:func:`_prepbn_math` / :func:`_rep_math`).
    Called directly in eager code: an operator call costs ~30-70 µs more dispatch (see :mod:`normkit.kernels.ops`).
    """

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, bn_w, bn_b, alpha, lam, mean, var, row_mean, row_rstd, training, ln_eps, bn_eps):  # type: ignore[override]
        has_ln = row_mean is not None
        w1, gb, r, rg, bb, sa = _ops.rep_mix_coefficients(x, ln_w, ln_b, bn_w, bn_b, alpha, lam, var, bn_eps, has_ln)
        mu = mean.to(x.dtype)
        y = _cpu.prepbn_out(x, row_mean, row_rstd, w1, rg, mu, bb, sa)
        ctx.cfg = (lam, training, ln_eps, bn_eps, sa)
        ctx.save_for_backward(x, ln_w, ln_b, bn_w, bn_b, alpha, mean, var, row_mean, row_rstd, w1, gb, mu, r)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, ln_w, ln_b, bn_w, bn_b, alpha, mean, var, row_mean, row_rstd, w1, gb, mu, r = ctx.saved_tensors
        lam, training, ln_eps, bn_eps, sa = ctx.cfg
        grads = _mix_grads(
            ctx.needs_input_grad, gy, (x, ln_w, ln_b, bn_w, bn_b, alpha), lam, mean, var, row_mean, training,
            ln_eps, bn_eps,
            lambda: _cpu.prepbn_backward(gy, x, row_mean, row_rstd, w1, gb, mu, r, sa, training), mu, r,
        )
        return (*grads, *([None] * 8))


def _mix_grads(needs, gy, inputs, lam, mean, var, row_mean, training, ln_eps, bn_eps, kernel, mu, r):  # type: ignore[no-untyped-def]
    """``(∂x, ∂γ_ln, ∂β_ln, ∂γ, ∂β, ∂α)`` of the kernels' mix, ``inputs`` = (x, γ_ln, β_ln, γ, β, α): from
    ``kernel()`` = (∂x, sums), or, in a double backward (grad mode on), autograd replayed on the plain formula."""
    x = inputs[0]
    if torch.is_grad_enabled():  # create_graph=True: autograd through the plain formula
        if row_mean is not None:
            return replay_grads(lambda *t: _prepbn_math(*t, lam, ln_eps, bn_eps), inputs, needs[:6], gy)
        stats = (None, None) if training else (mean.to(x.dtype), var.to(x.dtype))
        dx, dw, db, da = replay_grads(
            lambda x, w, b, a: _rep_math(x, w, b, a, *stats, training, bn_eps), (x, *inputs[3:]),
            (needs[0], *needs[3:6]), gy,
        )
        zero_ln = [torch.zeros_like(t) if need and t is not None else None for t, need in zip(inputs[1:3], needs[1:3])]
        return [dx, *zero_ln, dw, db, da]  # (λ = 0: PRepBN's LayerNorm parameters get 0, as the plain mix)
    dx, sums = kernel()
    return [dx if needs[0] else None,
            *_ops.rep_mix_param_grads(sums, lam, row_mean is not None, mu, r, inputs[1:], needs[1:6], x.dtype)]


def _op_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, ln_w, ln_b, bn_w, bn_b, alpha, lam, mean, var, row_mean, row_rstd, training, ln_eps, bn_eps = inputs
    ctx.save_for_backward(x, ln_w, ln_b, bn_w, bn_b, alpha, mean, var, row_mean, row_rstd)
    ctx.cfg = (lam, training, ln_eps, bn_eps)


def _op_backward(ctx, gy):  # noqa: ANN001, ANN202
    """The autograd formula of ``torch.ops.normkit.rep_batch_norm_mix``: :func:`_mix_grads` with the backward operator."""
    x, ln_w, ln_b, bn_w, bn_b, alpha, mean, var, row_mean, row_rstd = ctx.saved_tensors
    lam, training, ln_eps, bn_eps = ctx.cfg
    mu = mean.to(x.dtype)
    r = torch.rsqrt(var.double() + bn_eps).to(x.dtype)
    grads = _mix_grads(
        ctx.needs_input_grad, gy, (x, ln_w, ln_b, bn_w, bn_b, alpha), lam, mean, var, row_mean, training, ln_eps,
        bn_eps,
        lambda: torch.ops.normkit.rep_batch_norm_mix_backward(
            gy, x, ln_w, bn_w, alpha, lam, mean, var, row_mean, row_rstd, training, bn_eps
        ),
        mu, r,
    )
    return (*grads, *([None] * 8))


_ops.rep_batch_norm_mix.register_autograd(_op_backward, setup_context=_op_setup)


def _kernels_take(x2d: Tensor, backend: str | None, *params: Tensor | None) -> bool:
    """Whether :class:`_RepBNKernelFn` (``csrc/rep_batch_norm.cpp``) runs this call: backend ``"auto"`` or
    ``"kernels"`` (``"native"`` keeps the ATen path), eager code, a CPU input the kernels take."""
    name = _backend.get_backend() if backend is None else backend
    if name not in ("auto", "kernels") or torch.compiler.is_compiling() or not _ops.accepts(x2d, *params):
        return False
    _backend.note("rep_batch_norm", "kernels")  # for backend.record() (the `runs` column of `normkit kernels`)
    return True


def _kernel_stats(
    x2d: Tensor, has_ln: bool, ln_eps: float, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
    """The kernel's pass 1: per-channel batch mean and variance (float64) and, with ``has_ln``, the per-row
    LayerNorm statistics, then torch's running-statistics update. None, with the running statistics as
    before, where a variance is not finite or a channel is ill-conditioned for the one-read variance."""
    row_mean, row_rstd, col, ok = _cpu.prepbn_stats(x2d, has_ln, ln_eps)
    if not ok:
        return None
    _update_running(running_mean, running_var, col[0], col[1], x2d.shape[0], momentum)
    return col[0], col[1], row_mean, row_rstd


def prepbn_mix_fused(
    x: Tensor, ln_w: Tensor, ln_b: Tensor, bn_w: Tensor, bn_b: Tensor, alpha: Tensor, lam: Tensor,
    running_mean: Tensor, running_var: Tensor, momentum: float, ln_eps: float, bn_eps: float,
    backend: str | None = None,
) -> Tensor | None:
    """PRepBN's training mix in one node for eager float32/float64 input with all four affine parameters.

    With backend ``"auto"``/``"kernels"`` and normkit's C++ kernels: :class:`_RepBNKernelFn` (two reads of x
    forward, two of ∂L/∂y and x backward; at λ = 0 without the LayerNorm terms). Otherwise, or where the
    kernels' one-read statistics decline (a non-finite or ill-conditioned variance): :class:`_PRepBNMixFn`,
    the batch statistics from :func:`_batch_stats`. The running statistics follow torch's convention.
    Returns None, with the running statistics as before, where a channel's variance overflows, for
    the caller's general path.
    """
    c = x.shape[-1]
    x2d = x.reshape(-1, c).contiguous()
    if _kernels_take(x2d, backend, ln_w, ln_b, bn_w, bn_b, alpha, running_mean, running_var):
        lam_f = float(lam)
        st = _kernel_stats(x2d, lam_f != 0.0, ln_eps, running_mean, running_var, momentum)
        if st is not None:
            return _RepBNKernelFn.apply(x2d, ln_w, ln_b, bn_w, bn_b, alpha, lam_f, *st, True, ln_eps, bn_eps).view(x.shape)
    stats = _batch_stats(x2d, running_mean, running_var, momentum)
    if stats is None:
        return None
    mean, var = stats
    y = _PRepBNMixFn.apply(x2d, ln_w, ln_b, bn_w, bn_b, alpha, lam.to(x.dtype), mean, var, ln_eps, bn_eps)
    return y.view(x.shape)


def prepbn_lambda(warm: Tensor, step: Tensor, total_step: Tensor, r0: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The LN weight λ of PRepBN's next training forward, as a 0-dim tensor (no host sync).

    Official ``LinearNorm``: during warm-up (``warm > 0``) the output is ``LN(x)`` alone (λ = 1);
    afterwards ``λ = r0 · iter / total_step`` with ``iter`` counting down from ``total_step``
    to 0, so λ goes linearly from ``r0`` to 0. ``total_step = 0`` gives λ = 0 right after warm-up
    (the official code would divide 0/0).
    """
    frac = step.to(dtype) / total_step.to(dtype).clamp_min(1)
    return torch.where(warm > 0, torch.ones((), dtype=dtype, device=frac.device), r0 * frac)


@torch.no_grad()
def prepbn_advance_(warm: Tensor, step: Tensor, num_step: Tensor | None = None, accumulation_steps: int = 1) -> None:
    """Advance PRepBN's counters after one training forward, in place, without host syncs.

    As the official code: during warm-up ``warm -= 1``; afterwards ``iter -= 1`` while
    ``iter > 0``. With ``accumulation_steps = k > 1`` (the official LLaMA variant, k = 16) the
    counters move only on every k-th call (``num_step`` cycles through ``0 … k−1``).
    """
    in_warm = warm > 0
    tick = torch.ones_like(in_warm) if num_step is None else num_step == 0
    warm.sub_((in_warm & tick).to(warm.dtype))
    step.sub_((~in_warm & (step > 0) & tick).to(step.dtype))
    if num_step is not None:
        num_step.copy_((num_step + 1) % accumulation_steps)


def prepbn_mix(ln: Tensor, rep: Tensor, lam: Tensor) -> Tensor:
    """``λ · LN(x) + (1 − λ) · RepBN(x)`` in the outputs' dtype (λ computed in float32/float64).

    At the schedule's ends a branch whose weight is exactly 0 is left out rather than multiplied
    by 0: at λ = 1 (pure LayerNorm, the start of training) one NaN token makes the batch
    statistics NaN, and ``0 · NaN`` would carry it into every other sample's output; LayerNorm
    alone keeps it in its token (issue 12, item 6). ``torch.where`` keeps this branch-free.
    """
    lam = lam.to(accumulation_dtype(ln.dtype))
    mixed = lam * ln + (1 - lam) * rep
    return torch.where(lam == 1, ln.to(mixed.dtype), torch.where(lam == 0, rep.to(mixed.dtype), mixed)).to(ln.dtype)
