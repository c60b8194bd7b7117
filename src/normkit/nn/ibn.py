"""IBN: Instance-Batch Normalization, the norm of IBN-Net (``ibn``).

Pan, Luo, Shi, Tang, "Two at Once: Enhancing Learning and Generalization Capacities via
IBN-Net", ECCV 2018, arXiv:1807.09441. Official code: ``XingangPan/IBN-Net``
(``ibnnet/modules.py``, class ``IBN``). The IBN-a / IBN-b ResNet placements are in
:mod:`normkit.models.resnet`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.functional._core import check_channels_first, trailing_numel
from normkit.functional.batch_norm import _update_running
from normkit.functional.batch_variants import (
    bn_coefficients,
    moments_fast_path,
    pooled_moments,
    sample_affine,
    sample_moments,
)
from normkit.nn._base import check_module_args, options_repr, sync_reducer
from normkit.nn.batch_norm import BatchNorm, InstanceNorm
from normkit.nn.batch_variants import batch_norm_step
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

IBN_PAPER = Paper(
    "Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net",
    2018,
    "1807.09441",
    "Pan, Luo, Shi, Tang",
)


def ibn_split(planes: int, ratio: float) -> int:
    """Number of channels that get InstanceNorm: ``int(planes * ratio)`` (truncation, as official)."""
    return int(planes * ratio)


@register_norm(
    "ibn",
    family="instance-batch",
    paper=IBN_PAPER,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="InstanceNorm (affine) on the first ratio·C channels, BatchNorm on the rest (IBN-Net)",
    aliases=("ibnorm", "instance_batch_norm"),
)
class IBN(nn.Module):
    """Instance-Batch Normalization, ``IBN(planes, ratio=0.5)`` (Pan et al. 2018, arXiv:1807.09441).

    As the official ``IBN`` class: ``half = int(planes · ratio)`` (truncated). The first
    ``half`` channels go through ``IN = InstanceNorm(half, affine=True)`` (per-sample,
    per-channel statistics over the spatial dims, eps 1e-5, no running statistics), the other
    ``planes − half`` through ``BN = BatchNorm(planes − half)`` (torch defaults: momentum 0.1,
    eps 1e-5, running statistics in eval); the results are concatenated, IN part first::

        y = cat(IN(x[:, :half]), BN(x[:, half:]))

    Keys match the official checkpoints: ``IN.weight``, ``IN.bias``, ``BN.weight``, ``BN.bias``,
    ``BN.running_mean``, ``BN.running_var``, ``BN.num_batches_tracked``.

    Divergence: the official code splits with ``torch.split(x, half, 1)``, which only yields the
    two intended parts when ``half ≥ planes − half`` (ratio ≥ 0.5 and even ``planes`` at 0.5);
    otherwise it crashes. Here the split is always ``[half, planes − half]``, identical wherever
    the official code runs. ``half`` must be at least 1 and below ``planes`` (else use plain
    InstanceNorm or BatchNorm). Accepts any ``(N, C, *spatial)`` input with ≥ 1 spatial dim.
    ``process_group`` synchronizes the BN part (the IN part is per sample and stays local).
    """

    def __init__(
        self,
        planes: int,
        ratio: float = 0.5,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_module_args(eps, backend)
        if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise ValueError(f"IBN: ratio must be in (0, 1), got {ratio!r}")
        half = ibn_split(planes, ratio)
        if not 0 < half < planes:
            raise ValueError(
                f"IBN: int(planes * ratio) = int({planes} * {ratio}) = {half} must be between 1 and planes - 1 "
                "so both the InstanceNorm and the BatchNorm part get channels"
            )
        self.planes = int(planes)
        self.ratio = float(ratio)
        self.half = half
        kw = {"device": device, "dtype": dtype}
        self.IN = InstanceNorm(half, eps, affine=True, stats_dtype=stats_dtype, backend=backend, **kw)
        self.BN = BatchNorm(
            planes - half, eps, momentum, stats_dtype=stats_dtype, backend=backend, process_group=process_group, **kw
        )

    def reset_parameters(self) -> None:
        self.IN.reset_parameters()
        self.BN.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_channels_first(x, self.planes, type(self).__name__)
        if x.dim() < 3:
            raise ValueError(f"IBN expects (N, C, *spatial) input with at least 3 dims, got shape {tuple(x.shape)}")
        if trailing_numel(x) > 1 and moments_fast_path(self.BN.backend) and sync_reducer(self.BN) is None:
            return self._fused(x)
        a, b = torch.split(x, [self.half, self.planes - self.half], dim=1)
        return torch.cat((self.IN(a), self.BN(b)), dim=1)

    def _fused(self, x: Tensor) -> Tensor:
        """Both halves as one per-(sample, channel) affine map of x: one statistics pass over all channels
        (the IN half uses the per-sample moments, the BN half their batch pool), one output pass; no split
        copies, no concatenation, only x saved for backward (``backend="auto"``; the module's plain
        ``cat(IN(a), BN(b))`` is what ``"eager"`` runs)."""
        h, bn = self.half, self.BN
        mean, var = sample_moments(x, bn.stats_dtype)
        a_in, b_in = bn_coefficients(mean[:, :h], var[:, :h], self.IN.weight, self.IN.bias, self.IN.eps)
        if bn.training or bn.running_mean is None:
            mu, sigma2 = pooled_moments(mean[:, h:], var[:, h:])
            factor = batch_norm_step(bn)
            if bn.training and bn.running_mean is not None:
                _update_running(bn.running_mean, bn.running_var, mu, sigma2, x.numel() / x.shape[1], factor)
        else:
            mu, sigma2 = bn.running_mean, bn.running_var
        a_bn, b_bn = bn_coefficients(mu, sigma2, bn.weight, bn.bias, bn.eps)
        n = x.shape[0]
        scale = torch.cat((a_in, a_bn.to(a_in.dtype).expand(n, -1)), 1)
        shift = torch.cat((b_in, b_bn.to(b_in.dtype).expand(n, -1)), 1)
        return sample_affine(x, scale, shift, moments_of=mean)

    def extra_repr(self) -> str:
        return f"{self.planes}, ratio={self.ratio}, half={self.half}" + options_repr(self.IN)
