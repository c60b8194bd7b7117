"""Batch-Channel Normalization (``bcn``) and its micro-batch estimated BatchNorm (``estbn``).

Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019, arXiv:1903.10520 (v1 titled "Weight Standardization").
Weight Standardization itself lives in :mod:`normkit.nn.weight_standardization`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.functional._core import check_channels_first, trailing_numel
from normkit.functional.batch_channel_norm import bcn_coefficients, channel_norm, estbn_update, estimated_batch_norm
from normkit.functional.batch_norm import _update_running
from normkit.functional.batch_variants import (
    moments_fast_path,
    pooled_moments,
    sample_affine,
    sample_moments,
)
from normkit.nn._base import group_sample_kwargs, options_repr, set_options, sync_reducer
from normkit.nn.batch_norm import BatchNorm
from normkit.nn.batch_variants import batch_norm_step
from normkit.registry import Paper, register_norm
from normkit.stats import Reducer
from normkit.sync import ProcessGroupLike

BCN_PAPER = Paper(
    "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
    2019,
    "1903.10520",
    "Qiao, Wang, Liu, Shen, Yuille",
)


@register_norm(
    "estbn",
    family="batch",
    paper=BCN_PAPER,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="BN that always normalizes with running estimates, updated without gradient (BCN's micro-batch BN)",
    aliases=("estimated_batchnorm",),
)
class EstBN(nn.Module):
    """Estimated BatchNorm, the micro-batch BN of BCN (official README class ``EstBN``).

    Qiao et al. 2019, arXiv:1903.10520. Always normalizes with the running estimates, even in
    training: ``y = (x − μ̂) / sqrt(σ̂² + eps) · w + b``. A training forward first updates them
    without gradient at rate ``r`` (buffer ``estbn_moving_speed``)::

        μ̂  ← (1 − r)·μ̂  + r·mean_{N,*}(x)
        σ̂² ← (1 − r)·σ̂² + r·mean_{N,*}((x − μ̂_old)²)

    The variance is centred on the *old* estimate and is biased, as the official code.
    Parameters/buffers have the official names: ``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked`` (counted here; never incremented officially),
    ``estbn_moving_speed`` (shape (1,)).

    Divergence: the official buffer ``estbn_moving_speed`` starts at 0 and is set by a schedule
    that is not in the released code (with 0 the estimates never move). Here it starts at
    ``moving_speed`` (default 0.1, BN's usual momentum); pass ``moving_speed=0.0`` and write the
    buffer from your own schedule to reproduce the official setup. ``eps`` is 1e-5 as official.
    Any ``(N, C, *)`` input (the official code assumes 4-D).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        moving_speed: float = 0.1,
        *,
        stats_dtype: torch.dtype | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, stats_dtype=stats_dtype, process_group=process_group)
        if not isinstance(moving_speed, (int, float)) or not 0.0 <= moving_speed <= 1.0:
            raise ValueError(f"EstBN: moving_speed must be a number in [0, 1], got {moving_speed!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.moving_speed = float(moving_speed)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("estbn_moving_speed", torch.full((1,), self.moving_speed, **kw))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_channels_first(x, self.num_features, type(self).__name__)
        if self.training:
            self.num_batches_tracked.add_(1)
        return estimated_batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.estbn_moving_speed,
            self.eps,
            reducer=sync_reducer(self),
            stats_dtype=self.stats_dtype,
        )

    def extra_repr(self) -> str:
        speed = self.moving_speed if self.estbn_moving_speed.is_meta else float(self.estbn_moving_speed[0])
        return f"{self.num_features}, eps={self.eps}, moving_speed={speed:g}" + options_repr(self)


@register_norm(
    "bcn",
    family="batch-channel",
    paper=BCN_PAPER,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="BatchNorm (own affine) then per-sample group norm with a per-group affine",
    aliases=("batch_channel_norm", "bcnorm"),
    sample_kwargs=group_sample_kwargs,
)
class BatchChannelNorm(nn.Module):
    """Batch-Channel Normalization, ``BatchChannelNorm(num_channels, num_groups=32)``.

    Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", arXiv:1903.10520. As the official training code (``imagenet/models/
    layers.py``, class ``GN``, which produced the released BCN+WS checkpoints):

    1. ``a = pbn(x)``: a BatchNorm with its own per-channel affine (momentum 0.1, eps 1e-5,
       batch statistics in training, running statistics in eval);
    2. per-sample group normalization of ``a`` over ``num_groups`` groups (C/G channels and all
       positions, biased variance, eps), the same in training and eval;
    3. ``y = weight_g · â + bias_g`` with ``weight``, ``bias`` of shape ``(1, G, 1)``: one value
       per *group*, not per channel (the official code's choice, also in its README and DeepLab
       ``PBCNorm``).

    Keys match the official checkpoints: ``pbn.weight``, ``pbn.bias``, ``pbn.running_mean``,
    ``pbn.running_var``, ``pbn.num_batches_tracked``, ``weight``, ``bias``.

    ``estimate=True`` (the official README's ``BCNorm(estimate=True)``) replaces ``pbn`` with
    :class:`EstBN`, the paper's micro-batch BCN that normalizes with running estimates updated
    at rate ``moving_speed`` (see :class:`EstBN` for the divergence in its default).
    ``eps`` is used by both steps (1e-5 in both in the official code). Use it with
    weight-standardized convolutions (:class:`normkit.nn.WSConv2d`), as the paper does.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        estimate: bool = False,
        moving_speed: float = 0.1,
        reducer: Reducer | None = None,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or num_channels % num_groups:
            raise ValueError(
                f"BatchChannelNorm: num_groups={num_groups!r} must be a positive divisor of num_channels={num_channels}"
            )
        if estimate and reducer is not None:
            raise ValueError("BatchChannelNorm: estimate=True (EstBN) does not support a reducer")
        self.num_channels = int(num_channels)
        self.num_groups = num_groups
        self.eps = float(eps)
        self.estimate = bool(estimate)
        kw = {"device": device, "dtype": dtype}
        self.pbn: nn.Module
        if estimate:
            self.pbn = EstBN(num_channels, eps, moving_speed, stats_dtype=stats_dtype, process_group=process_group, **kw)
        else:
            self.pbn = BatchNorm(
                num_channels, eps, momentum, reducer=reducer, stats_dtype=stats_dtype, backend=backend,
                process_group=process_group, **kw,
            )
        self.weight = nn.Parameter(torch.empty(1, num_groups, 1, **kw))
        self.bias = nn.Parameter(torch.empty(1, num_groups, 1, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.pbn.reset_parameters()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_channels_first(x, self.num_channels, type(self).__name__)
        # (a folded BCN's pbn is an Identity, after fold_norms: then the two steps run as written)
        if (trailing_numel(x) > 1 and isinstance(self.pbn, (BatchNorm, EstBN)) and moments_fast_path(self.backend)
                and sync_reducer(self.pbn) is None):
            return self._fused(x)
        return channel_norm(
            self.pbn(x), self.num_groups, self.weight, self.bias, self.eps, stats_dtype=self.stats_dtype, backend=self.backend
        )

    def _fused(self, x: Tensor) -> Tensor:
        """Both steps as one per-(sample, channel) affine map of x (:func:`bcn_coefficients`): one statistics
        pass, one output pass, only x saved for backward (``backend="auto"``; ``"eager"`` runs the two steps)."""
        mean, var = sample_moments(x, self.stats_dtype)
        pbn = self.pbn
        if self.estimate:
            bn_mean, bn_var = pbn.running_mean, pbn.running_var
            if pbn.training:
                pbn.num_batches_tracked.add_(1)
                mu, sigma2 = pooled_moments(mean.detach(), var.detach())
                bn_mean, bn_var = estbn_update(pbn.running_mean, pbn.running_var, mu, sigma2, pbn.estbn_moving_speed)
        elif pbn.training or pbn.running_mean is None:
            bn_mean, bn_var = pooled_moments(mean, var)
            factor = batch_norm_step(pbn)
            if pbn.training and pbn.running_mean is not None:
                _update_running(pbn.running_mean, pbn.running_var, bn_mean, bn_var, x.numel() / x.shape[1], factor)
        else:
            bn_mean, bn_var = pbn.running_mean, pbn.running_var
        scale, shift = bcn_coefficients(
            mean, var, bn_mean, bn_var, pbn.weight, pbn.bias, self.num_groups, self.weight, self.bias, self.eps
        )
        return sample_affine(x, scale, shift, moments_of=mean)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"
            + (", estimate=True" if self.estimate else "")
            + options_repr(self)
        )
