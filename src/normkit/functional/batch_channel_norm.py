"""Batch-Channel Normalization (BCN) and the micro-batch "estimated" BatchNorm (EstBN).

Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019, arXiv:1903.10520. Official code:
``joe-siyuan-qiao/Batch-Channel-Normalization`` (``imagenet/models/layers.py`` class ``GN``,
README ``BCNorm`` / ``EstBN``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.functional._core import check_channels_first, check_eps, check_param, snapshot
from normkit.functional.batch_norm import batch_norm, channel_affine, group_norm
from normkit.functional.batch_variants import (
    batch_moments,
    bn_coefficients,
    moments_fast_path,
    pooled_moments,
    sample_affine,
    sample_moments,
)
from normkit.stats import Reducer, accumulation_dtype
from normkit.sync import reduce_packed


def _check_groups(c: int, num_groups: int, what: str) -> None:
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"{what}: num_groups={num_groups!r} must be a positive divisor of the {c} channels")


def _group_to_channel(p: Tensor | None, num_groups: int, c: int) -> Tensor | None:
    """Per-group parameter (any shape with G elements, e.g. the official (1, G, 1)) → per-channel (C,)."""
    if p is None:
        return None
    return p.reshape(num_groups, 1).expand(num_groups, c // num_groups).reshape(c)


def channel_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """BCN's channel normalization: per-sample group normalization with a *per-group* affine.

    ``x`` is ``(N, C, *)``; channels split into ``num_groups`` contiguous groups. For sample n
    and group g, ``x̂ = (x − μ_ng) / sqrt(σ²_ng + eps)`` with μ, σ² (biased) over the group's
    channels and all positions, then ``y = w_g · x̂ + b_g``. ``weight``/``bias`` hold one value per
    group (the official shape ``(1, G, 1)`` or any shape with G elements), unlike GroupNorm's
    per-channel affine. The same computation in training and eval.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "channel_norm")
    _check_groups(c, num_groups, "channel_norm")
    check_param(weight, num_groups, "weight (one value per group)", "channel_norm")
    check_param(bias, num_groups, "bias (one value per group)", "channel_norm")
    return group_norm(
        x,
        num_groups,
        _group_to_channel(weight, num_groups, c),
        _group_to_channel(bias, num_groups, c),
        eps,
        stats_dtype=stats_dtype,
        backend=backend,
    )


def estimated_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    moving_speed: Tensor | float = 0.1,
    eps: float = 1e-5,
    *,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Micro-batch BN of BCN ("EstBN" in the official README): always normalizes with the estimates.

    Training first updates the estimates in place, without gradient, at rate ``r = moving_speed``::

        μ̂  ← (1 − r)·μ̂  + r·mean_{N,*}(x)
        σ̂² ← (1 − r)·σ̂² + r·mean_{N,*}((x − μ̂_old)²)     # centred on the *old* estimate

    and then (training and eval alike) ``y = (x − μ̂) / sqrt(σ̂² + eps) · w + b`` with the
    (updated) estimates treated as constants, so no gradient flows through batch statistics.
    ``moving_speed`` may be a tensor (the official buffer ``estbn_moving_speed``) so a schedule
    can change it without recompiling. ``reducer`` (:mod:`normkit.sync`): both batch means run over
    every process's samples, from one collective of ``(n, Σ(x − μ̂_old), Σ(x − μ̂_old)²)``.

    Cost: one statistics pass (the variance about μ̂_old from the batch variance by
    ``σ²_B + (μ_B − μ̂_old)²``) plus one per-channel affine pass with the new estimates, saving only x:
    on ``backend="auto"`` per-sample moments and :func:`normkit.functional.batch_variants.sample_affine`
    (measured faster than ATen's eval-mode BatchNorm on CPU), otherwise
    :func:`normkit.functional.batch_variants.batch_moments` and BatchNorm in eval mode. A batch
    variance past float32's range is computed in float64 and the output from it, so it stays right
    (the buffer then holds inf, the true value's float32 rounding).
    """
    eps = check_eps(eps)
    c = check_channels_first(x, running_mean.numel(), "estimated_batch_norm")
    if running_var.numel() != c:
        raise ValueError(f"estimated_batch_norm: running_var must have {c} elements, got shape {tuple(running_var.shape)}")
    check_param(weight, c, "weight", "estimated_batch_norm")
    check_param(bias, c, "bias", "estimated_batch_norm")
    if not training:
        return channel_affine(x, running_mean, running_var, weight, bias, eps)
    with torch.no_grad():
        r = torch.as_tensor(moving_speed, device=x.device).reshape(-1)[:1]
        fast = reducer is None and moments_fast_path(backend)
        if fast:  # "auto": per-sample moments (one pass), then one affine pass below
            rescued = False
            new_mean, new_var = estbn_update(running_mean, running_var, *pooled_moments(*sample_moments(x, stats_dtype)), r)
        elif reducer is None:
            # one pass: the biased batch variance about the batch mean, moved to the old estimate by the
            # parallel-axis identity mean((x − μ̂_old)²) = σ²_B + (μ_B − μ̂_old)² (a sum of non-negative terms)
            mean, var_b, rescued = batch_moments(x, stats_dtype)
            new_mean, new_var = estbn_update(running_mean, running_var, mean, var_b, r)
        else:
            rescued = False
            xf = x.detach().to(accumulation_dtype(x.dtype, stats_dtype))
            dims = (0, *range(2, x.dim()))
            old_mean = running_mean.reshape((1, c) + (1,) * (x.dim() - 2)).to(xf.dtype)
            d = xf - old_mean
            n, s1, s2 = reduce_packed([xf.new_full((1,), x.numel() // c), d.sum(dims), d.square().sum(dims)], reducer)
            # the sums are about the old estimate already: mean((x − μ̂_old)²) = s2 / n, batch variance about μ_B
            mean = running_mean.to(xf.dtype) + s1 / n
            new_mean, new_var = estbn_update(running_mean, running_var, mean, s2 / n - (s1 / n).square(), r)
    if fast:  # (measured faster than ATen's eval-mode BatchNorm backward on CPU)
        scale, shift = bn_coefficients(new_mean, new_var, weight, bias, eps)
        return sample_affine(x, scale.reshape(1, c), shift.reshape(1, c))
    if rescued or reducer is not None:
        return channel_affine(x, new_mean, new_var, weight, bias, eps)
    # the estimates are constants for autograd: BatchNorm in eval mode (ATen's fused op on "auto")
    return batch_norm(x, new_mean, new_var, weight, bias, False, 0.0, eps, backend=backend)


@torch.no_grad()
def estbn_update(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var_b: Tensor, r: Tensor
) -> tuple[Tensor, Tensor]:
    """EstBN's estimate update in place from the batch mean μ_B and biased batch variance σ²_B (no gradient).

    ``μ̂ ← (1 − r)·μ̂ + r·μ_B`` and ``σ̂² ← (1 − r)·σ̂² + r·mean((x − μ̂_old)²)`` where the variance about the
    *old* estimate follows from the batch variance by the parallel-axis identity
    ``mean((x − μ̂_old)²) = σ²_B + (μ_B − μ̂_old)²`` (a sum of non-negative terms). Returns the new estimates as
    fresh tensors (the buffers are overwritten by the next call, so autograd must not see them), in float64
    when σ²_B came back in float64 (overflowed float32: the buffer then holds inf, the output stays right).
    """
    dt = var_b.dtype if var_b.dtype == torch.float64 else running_var.dtype
    var = var_b.to(dt) + (mean.to(dt) - running_mean.to(dt)).square()
    r = r.to(dt)
    # one aten.cat that the forward needs (for the buffer writes): torch.compile then saves it for backward
    # instead of recomputing the estimates there from the updated buffers (functional._core.snapshot)
    both = snapshot(running_mean.to(dt) * (1 - r) + r * mean.to(dt), running_var.to(dt) * (1 - r) + r * var)
    new_mean, new_var = both.split(running_mean.numel())
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return new_mean, new_var


def bcn_coefficients(
    mean: Tensor,
    var: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """BCN as one per-(sample, channel) affine map ``y = x·A + B`` from the per-sample moments of x.

    ``mean``, ``var``: (N, C) moments of x over the positions; ``bn_mean``, ``bn_var``: (C,) the statistics
    step 1 normalizes with (batch, running or estimated). Step 1 is ``a = x·s + t`` per channel, so a's
    per-sample moments are ``s·m + t`` and ``s²·v``; step 2's group moments pool them over each group's
    channels exactly (:func:`normkit.functional.batch_variants.pooled_moments`), and the two affines compose.
    """
    n, c = mean.shape
    s, t = bn_coefficients(bn_mean, bn_var, bn_weight, bn_bias, eps)
    am = (mean * s + t).reshape(n, num_groups, c // num_groups)
    av = (var * s.square()).reshape(n, num_groups, c // num_groups)
    gm, gv = pooled_moments(am, av, dim=2)
    rg = torch.rsqrt(gv + eps)  # (N, G)
    if weight is not None:
        rg = rg * weight.reshape(1, num_groups).to(rg.dtype)
    shift = -gm * rg
    if bias is not None:
        shift = shift + bias.reshape(1, num_groups).to(shift.dtype)
    # per group → per channel by expand (its backward is a sum; repeat_interleave's is a slow scatter_add on CPU)
    rg_c = rg.unsqueeze(2).expand(n, num_groups, c // num_groups).reshape(n, c)
    return s * rg_c, t * rg_c + shift.unsqueeze(2).expand(n, num_groups, c // num_groups).reshape(n, c)


def batch_channel_norm(
    x: Tensor,
    num_groups: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    estimate: bool = False,
    moving_speed: Tensor | float = 0.1,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Batch-Channel Normalization of an ``(N, C, *)`` tensor (Qiao et al. 2019, arXiv:1903.10520).

    As the official ``GN`` class (``imagenet/models/layers.py``):

    1. batch normalization with its own per-channel affine ``bn_weight``/``bn_bias``:
       ``a = (x − μ_c) / sqrt(σ²_c + eps) · γ_c + β_c`` — batch statistics in training
       (running buffers updated as torch's BN, ``momentum`` weighting the new batch), running
       statistics in eval; with ``estimate=True`` the micro-batch estimates of
       :func:`estimated_batch_norm` instead (rate ``moving_speed``);
    2. :func:`channel_norm`: per-sample group normalization of ``a`` over ``num_groups`` groups,
       then the per-group affine ``weight``/``bias`` (G values each).

    ``eps`` is used in both steps (the official code uses 1e-5 in both).
    """
    if estimate:
        if running_mean is None or running_var is None:
            raise ValueError("batch_channel_norm(estimate=True) needs running_mean and running_var")
        a = estimated_batch_norm(
            x, running_mean, running_var, bn_weight, bn_bias, training, moving_speed, eps,
            reducer=reducer, stats_dtype=stats_dtype, backend=backend,
        )
    else:
        a = batch_norm(
            x,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            training,
            momentum,
            eps,
            reducer=reducer,
            stats_dtype=stats_dtype,
            backend=backend,
        )
    return channel_norm(a, num_groups, weight, bias, eps, stats_dtype=stats_dtype, backend=backend)
