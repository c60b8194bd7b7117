"""SLAB's re-parameterizable BatchNorm (RepBN) and the progressive LN → RepBN schedule (PRepBN).

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, arXiv:2405.11582. Official code:
``xinghaochen/SLAB`` (``classification/models/prepbn.py``: ``RepBN``, ``LinearNorm``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.functional._core import check_float
from normkit.functional.batch_norm import batch_norm
from normkit.stats import Reducer, accumulation_dtype


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
    _check_tokens(x, None if running_mean is None else running_mean.numel(), "rep_batch_norm")
    if not isinstance(alpha, Tensor) or alpha.numel() != 1:
        raise ValueError(f"rep_batch_norm: alpha must be a one-element tensor, got {alpha!r}")
    y = batch_norm(
        x.movedim(-1, 1),
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        mask=None if mask is None else token_mask(mask, x, "rep_batch_norm").movedim(-1, 1),
        reducer=reducer,
        stats_dtype=stats_dtype,
        backend=backend,
    ).movedim(1, -1)
    return y + alpha.to(x.dtype) * x


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
