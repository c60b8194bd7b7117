"""BatchNorm, InstanceNorm and GroupNorm modules over channels-first ``(N, C, *)`` input.

They subclass torch's ``_BatchNorm`` / ``_InstanceNorm`` / ``GroupNorm`` so buffer and
parameter names (``running_mean``, ``running_var``, ``num_batches_tracked``, ``weight``,
``bias``) and ``isinstance`` checks are torch's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normkit import functional as F
from normkit.backend import native_below, resolve, thread_state
from normkit.functional import aten
from normkit.functional._core import check_channels_first, check_momentum
from normkit.nn import papers
from normkit.nn._base import FastPath, group_sample_kwargs, options_repr, set_options, sync_reducer
from normkit.registry import register_norm
from normkit.stats import Reducer
from normkit.sync import ProcessGroupLike


def _channels_last_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """A mask given in the caller's (N, *, C) layout, moved with the channels to (N, C, *).

    ``x.shape[:-1]`` (one flag per position, as for the token norms) and anything that broadcasts
    to ``x`` are accepted; the error names the caller's shapes, not the internal layout.
    """
    if mask is None:
        return None
    if mask.dim() == x.dim() - 1 and tuple(mask.shape) == tuple(x.shape[:-1]):
        mask = mask.unsqueeze(-1)
    try:
        mask = torch.broadcast_to(mask, x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the input shape {tuple(x.shape)} "
            f"(channels_last: give (N, *) or a shape that broadcasts to (N, *, C))"
        ) from None
    return mask.movedim(-1, 1)

class _Ranked:
    """Mixin for the torch-style aliases that accept only one input rank."""

    _ranks: tuple[int, ...] = ()

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"{type(self).__name__} expected {want} input (got {x.dim()}D input of shape {tuple(x.shape)})")


class BatchNorm(FastPath, _BatchNorm):
    """Batch Normalization for any ``(N, C, *)`` input, with torch's conventions.

    Ioffe & Szegedy 2015, arXiv:1502.03167. Training: ``y = (x − μ_B) / sqrt(σ²_B + eps) · w + b``
    with μ_B, σ²_B (biased) over N and all positions. Running statistics:
    ``r ← (1 − momentum)·r + momentum·batch`` with the *unbiased* batch variance;
    ``momentum=None`` gives the cumulative average ``1 / num_batches_tracked``.
    Eval uses the running statistics (batch statistics if ``track_running_stats=False``).

    Beyond torch: ``forward(x, mask)`` excludes padded positions from the statistics,
    ``process_group`` (a ``torch.distributed.ProcessGroup`` or ``"world"``; None = no sync)
    normalizes with the statistics of the whole distributed batch in training (one packed
    ``all_reduce`` per call, count-weighted, exact gradients; :mod:`normkit.sync`; gloo/CPU as
    NCCL/CUDA, where torch's ``SyncBatchNorm`` is CUDA-only), ``reducer`` is the lower-level hook
    (any cross-process sum, e.g. :func:`normkit.stats.all_reduce_sum`),
    and ``channels_last=True`` takes ``(*, C)`` input — e.g. BN over the batch and tokens of a
    transformer's ``(B, T, C)`` activations, as PowerNorm's and SLAB's BN baselines.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        reducer: Reducer | None = None,
        stats_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend, process_group=process_group)
        momentum = check_momentum(momentum, type(self).__name__, allow_none=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.channels_last = bool(channels_last)
        self.reducer = reducer
        self._plan_ready()

    _PLAN_ATTRS = frozenset({"backend", "stats_dtype", "channels_last", "reducer", "process_group", "affine",
                             "track_running_stats"})
    _nk_below = 0  # (class default: no fast path until planned)

    def _replan(self) -> None:
        """``_nk_below``: below it (elements; CPU, default backend, no mask) ``forward`` calls ATen's op
        directly — where ``"auto"`` runs ATen's op and its statistics go unchecked (training checks them
        for overflow from :data:`~normkit.functional.aten.ATEN_CHECK_MIN_NUMEL`); 0 for configurations
        ATen's op does not compute (``stats_dtype``, a reducer or process group, channels-last input), for
        subclasses with their own ``_forward`` (Batch Renorm, Ghost BN), and without affine parameters or
        running statistics (ATen's op would then not check the channel count)."""
        ok = (not self.channels_last and self.stats_dtype is None and self.reducer is None
              and getattr(self, "process_group", None) is None and type(self)._forward is BatchNorm._forward
              and (self.affine or self.track_running_stats))
        self._plan_set(_nk_below=min(native_below("batch_norm", self.backend), aten.ATEN_CHECK_MIN_NUMEL) if ok else 0)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expected an (N, C, *) input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None and self.num_features < x.numel() < self._nk_below and x.is_cpu and thread_state.plain:
            # the hot path: torch's BatchNorm.forward, calling ATen's op directly (more than one value
            # per channel: F.batch_norm's error for one, the registry's guard for none, on the path below)
            self._check_input_dim(x)
            factor, use_batch, keep, count = self._step_args()
            try:
                y = torch.batch_norm(
                    x, self.weight, self.bias, self.running_mean if keep else None,
                    self.running_var if keep else None, use_batch, factor, self.eps, False,
                )
            except RuntimeError:
                pass  # rejected: normkit's path below raises its own, clearer error
            else:
                if count is not None:
                    count.add_(1)
                return y
        return self._forward_any(x, mask)

    def _step_args(self) -> tuple[float, bool, bool, Tensor | None]:
        """torch's BatchNorm bookkeeping for one call: the running-average factor (``momentum``, or the
        cumulative 1/(calls + 1) when it is None), whether batch statistics are used, whether the running
        buffers are passed, and the ``num_batches_tracked`` counter this call advances (None: none)."""
        count = (self.num_batches_tracked if self.training and self.track_running_stats
                 and self.num_batches_tracked is not None else None)
        factor = 0.0 if self.momentum is None else self.momentum
        if count is not None and self.momentum is None:
            factor = 1.0 / (float(count) + 1)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return factor, use_batch, keep, count

    def _forward_any(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.channels_last:
            if x.dim() < 2 or x.shape[-1] != self.num_features:
                raise ValueError(
                    f"{type(self).__name__}(channels_last=True) expects input (N, *, {self.num_features}), got {tuple(x.shape)}"
                )
            return self._forward(x.movedim(-1, 1), _channels_last_mask(mask, x)).movedim(1, -1)
        return self._forward(x, mask)

    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        self._check_input_dim(x)
        check_channels_first(x, self.num_features, type(self).__name__)
        factor, use_batch, keep, count = self._step_args()
        if count is not None:
            count.add_(1)
        reducer = sync_reducer(self)
        if (mask is None and reducer is None and self.stats_dtype is None
                and resolve(self.backend, x, "batch_norm", True) == "native"):
            try:  # ATen's op directly: per-call cost as torch's BatchNorm (input checked above)
                y = aten.batch_norm(
                    x, self.running_mean if keep else None, self.running_var if keep else None,
                    self.weight, self.bias, use_batch, factor, self.eps,
                )
                if y is not None:  # else ATen's statistics overflowed: normkit's path below
                    return y
            except RuntimeError:
                pass  # rejected: normkit's path below raises its own, clearer error
        return F.batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
            mask=mask,
            reducer=reducer,
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        opts = options_repr(self)
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "") + opts


class BatchNorm1d(_Ranked, BatchNorm):
    """``BatchNorm`` accepting (N, C) or (N, C, L) only, as ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)


class BatchNorm2d(_Ranked, BatchNorm):
    """``BatchNorm`` accepting (N, C, H, W) only, as ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)


class BatchNorm3d(_Ranked, BatchNorm):
    """``BatchNorm`` accepting (N, C, D, H, W) only, as ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)


register_norm(
    "batchnorm",
    family="batch",
    paper=papers.BATCH_NORM,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="per-channel batch mean/variance in training, running averages in eval",
    aliases=("bn",),
    alias_classes={"batchnorm1d": BatchNorm1d, "batchnorm2d": BatchNorm2d, "batchnorm3d": BatchNorm3d},
)(BatchNorm)


@register_norm(
    "instancenorm",
    family="instance",
    paper=papers.INSTANCE_NORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="per-sample, per-channel mean/variance over the spatial dims",
    aliases=("in", "instance_norm"),
)
class InstanceNorm(_InstanceNorm):
    """Instance Normalization for any ``(N, C, *spatial)`` input (torch's defaults and keys).

    Ulyanov et al. 2016, arXiv:1607.08022: ``y = (x − μ_nc) / sqrt(σ²_nc + eps) · w + b`` over
    the spatial positions of each sample and channel. As in torch, ``affine=False`` and
    ``track_running_stats=False`` by default; with tracking, eval uses the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        momentum = check_momentum(momentum, type(self).__name__, allow_none=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)

    def _get_no_batch_dim(self) -> int:
        return 2

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 3:
            raise ValueError(f"{type(self).__name__} expected (N, C, *spatial) input with >= 3 dims, got {tuple(x.shape)}")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input_dim(x)
        check_channels_first(x, self.num_features, type(self).__name__)
        use_input_stats = self.training or not self.track_running_stats
        return F.instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
            0.1 if self.momentum is None else self.momentum, self.eps,
            mask=mask, stats_dtype=self.stats_dtype, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)


@register_norm(
    "groupnorm",
    family="group",
    paper=papers.GROUP_NORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="per-sample mean/variance over groups of channels and the spatial dims",
    aliases=("gn", "group_norm"),
    sample_kwargs=group_sample_kwargs,
)
class GroupNorm(FastPath, nn.GroupNorm):
    """Group Normalization, channels first: ``GroupNorm(num_channels, num_groups=32)``.

    Wu & He 2018, arXiv:1803.08494. Argument order is timm's (channels first, so
    ``norm_layer(C)`` works); keys and math are ``torch.nn.GroupNorm``'s. ``num_groups`` must
    divide ``num_channels``.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        if not isinstance(num_groups, int) or num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups!r} must be a positive divisor of num_channels={num_channels}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self._plan_ready()

    _PLAN_ATTRS = frozenset({"backend", "stats_dtype", "affine", "num_groups"})
    _nk_below = 0  # (class default: no fast path until planned)

    def _replan(self) -> None:
        """``_nk_below``: below it (elements; CPU, default backend, no mask) ``forward`` calls ATen's op
        directly — where ``"auto"`` runs ATen's op and its statistics go unchecked; 0 with a ``stats_dtype``
        or without affine parameters (ATen's op would then not check the channel count)."""
        ok = self.stats_dtype is None and self.affine
        self._plan_set(_nk_below=min(native_below("group_norm", self.backend), aten.ATEN_CHECK_MIN_NUMEL) if ok else 0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None and self.num_groups < x.numel() < self._nk_below and x.is_cpu and thread_state.plain:
            try:  # the hot path: ATen's op directly (more than one value per group: else F.group_norm's error below)
                return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, False)
            except RuntimeError:
                pass  # rejected: normkit's path below raises its own, clearer error
        check_channels_first(x, self.num_channels, type(self).__name__)
        if mask is None and self.stats_dtype is None and resolve(self.backend, x, "group_norm", True) == "native":
            y = aten.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # input checked above
            if y is not None:  # else ATen's statistics overflowed: normkit's path below
                return y
        return F.group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps,
            mask=mask, stats_dtype=self.stats_dtype, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)
