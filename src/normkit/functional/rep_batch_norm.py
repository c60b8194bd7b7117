"""SLAB's re-parameterizable BatchNorm (RepBN) and the progressive LN → RepBN schedule (PRepBN).

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, arXiv:2405.11582. Official code:
``xinghaochen/SLAB`` (``classification/models/prepbn.py``: ``RepBN``, ``LinearNorm``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from normkit import backend as _backend
from normkit.functional import aten as _aten
from normkit.functional._core import check_float
from normkit.functional._replay import replay_grads
from normkit.functional.batch_norm import batch_norm
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
    """``BN(x) + α·x`` on a contiguous ``(rows, C)`` input through ATen's BatchNorm, in one node.

    Forward: ``torch.native_batch_norm`` (which also updates the running buffers in training) and
    ``α·x`` added in place into its output. Backward: ATen's closed-form BN backward plus
    ``α·∂L/∂y`` added in place, ``∂L/∂α = Σ ∂L/∂y · x`` as one dot product. Saves the input and
    the per-channel statistics only. Where ATen's float32 statistics overflow (a channel's variance
    past the float range, :mod:`normkit.functional.aten`; checked on CPU at every size) the running buffers are restored and the
    output comes from normkit's overflow-safe path; that call's backward, and any double backward,
    replay autograd on :func:`_rep_math`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, rm, rv, training, momentum, eps):  # type: ignore[override]
        # checked at every size (a few µs; the α·x term would hide a zeroed BN part at small sizes)
        old = (rm.clone(), rv.clone()) if training and rm is not None and x.is_cpu else None
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, rm, rv, training, momentum, eps)
        ctx.replay = training and x.is_cpu and not _aten._finite(invstd)
        if ctx.replay:
            if old is not None:
                rm.copy_(old[0])
                rv.copy_(old[1])
            y = batch_norm(x, rm, rv, weight, bias, True, momentum, eps, backend="eager")
        ctx.cfg = (training, eps)
        # training never reads the running buffers in backward (and the next call updates them in place)
        keep = (None, None) if training else (rm, rv)
        ctx.save_for_backward(x, weight, bias, alpha, *keep, mean, invstd)
        return y.addcmul_(x, alpha.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, bias, alpha, rm, rv, mean, invstd = ctx.saved_tensors
        training, eps = ctx.cfg
        needs = ctx.needs_input_grad
        if ctx.replay or torch.is_grad_enabled():
            grads = replay_grads(
                lambda x, w, b, a: _rep_math(x, w, b, a, rm, rv, training, eps), (x, weight, bias, alpha), needs[:4], gy
            )
            return (*grads, None, None, None, None, None)
        gy = gy.contiguous()
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, rm, rv, mean, invstd, training, eps,
            [needs[0], weight is not None and needs[1], bias is not None and needs[2]],
        )
        if dx is not None:
            dx = dx.addcmul_(gy, alpha.to(gy.dtype))
        da = torch.dot(gy.reshape(-1), x.reshape(-1)).reshape(alpha.shape).to(alpha.dtype) if needs[3] else None
        return dx, dw, db, da, None, None, None, None, None


def _fast_ok(x: Tensor, params: tuple[Tensor | None, ...], mask: Tensor | None, reducer: Reducer | None,
             stats_dtype: torch.dtype | None, backend: str | None) -> bool:
    """Whether :class:`_RepBNFn` computes this call exactly: what ATen's BN takes (no mask, no
    reducer, no statistics dtype override, untracked buffers), float32/float64 throughout, eager code."""
    if mask is not None or reducer is not None or (stats_dtype is not None and stats_dtype != x.dtype):
        return False
    if x.dtype not in _NATIVE_DTYPES or torch.compiler.is_compiling():
        return False
    if any(p is not None and p.dtype != x.dtype for p in params) or any(
        p is not None and p.requires_grad for p in params[3:]
    ):
        return False
    return _backend.resolve(backend, x, "batch_norm", True) == "native"


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
    """
    c = _check_tokens(x, None if running_mean is None else running_mean.numel(), "rep_batch_norm")
    if not isinstance(alpha, Tensor) or alpha.numel() != 1:
        raise ValueError(f"rep_batch_norm: alpha must be a one-element tensor, got {alpha!r}")
    # BN over a (rows, C) view: ATen's 2-D BatchNorm runs channels-last rows ~5x faster than the
    # (B, C, T) transpose of the official code (same statistics)
    x2d = x.reshape(-1, c)
    if training and x2d.shape[0] <= 1 and reducer is None:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x2d.shape)}")
    if (training or running_mean is not None) and _fast_ok(
        x, (weight, bias, alpha, running_mean, running_var), mask, reducer, stats_dtype, backend
    ):
        y = _RepBNFn.apply(x2d.contiguous(), weight, bias, alpha, running_mean, running_var, training, momentum, eps)
        return y.view(x.shape)
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
