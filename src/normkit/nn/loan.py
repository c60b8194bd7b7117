"""Location-aware Adaptive Normalization (LOAN) module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.functional._core import check_momentum
from normkit.functional.loan import FREE_NORMS, loan
from normkit.nn._base import describe, set_options, sync_reducer
from normkit.nn.batch_norm import BatchNorm
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

LOAN_PAPER = Paper(
    "Location-aware Adaptive Normalization: A Deep Learning Approach for Wildfire Danger Forecasting",
    2023,
    "2212.08208",
    "Shams Eddin, Roscher, Gall",
)


def _sample_cond(x: Tensor) -> dict[str, Tensor]:
    spatial = tuple(x.shape[-1:]) if x.dim() == 3 else tuple(x.shape[-2:])
    return {"cond": torch.randn((x.shape[0], x.shape[1], *spatial), dtype=x.dtype, device=x.device)}


@register_norm(
    "loan",
    family="conditional",
    paper=LOAN_PAPER,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="BN without affine, then a per-location scale/shift predicted by convs from a static condition map",
    drop_in=False,
    extra_inputs=("cond",),
    sample_inputs=_sample_cond,
)
class LOAN(nn.Module):
    """Location-aware Adaptive Normalization, ``forward(x, cond)``.

    Shams Eddin, Roscher & Gall, IEEE TGRS 2023, arXiv:2212.08208 (official ``HakamShams/LOAN``,
    ``models/CNN.py::LOAN``):

        y = BN_{affine=False}(x) · (1 + γ) + β,   γ = conv_k(ReLU(BN_{affine=False}(cond))),  β likewise

    ``cond`` is the static (location) feature map ``(N, cond_channels, H, W)``; ``x`` is
    ``(N, C, H, W)`` or, as in the paper's wildfire model, ``(N, C, D, H, W)`` with γ, β broadcast along
    the time axis D. Both BNs keep running statistics (eval uses them), as ``nn.BatchNorm3d/2d`` in
    the official code. ``mlp_gamma`` / ``mlp_beta`` are ``k×k`` convs (k = 3) initialised
    N(0, 0.01) with zero bias, so γ ≈ β ≈ 0 at init. See :func:`normkit.functional.loan.loan`.

    State-dict keys match the official module: ``free_norm.running_mean/running_var/num_batches_tracked``
    (absent with ``free_norm="none"``, the official ``norm=False``), ``free_norm_cond.*``,
    ``mlp_gamma.weight/bias``, ``mlp_beta.weight/bias``.

    Args:
        num_features: channels C of ``x``.
        cond_channels: channels of ``cond`` (default: C). The official code has no default.
        kernel_size: odd kernel size of the γ/β convs (official 3).
        free_norm: ``"batch"`` (official), ``"none"`` (official ``norm=False``) or ``"instance"``
            (per-sample statistics without running stats; SPADE's option, not in the LOAN code).
        eps, momentum, track_running_stats: as ``torch.nn.BatchNorm`` (both BNs).
        process_group: synchronize both BNs' statistics over these processes in training
            (:mod:`normkit.sync`; both BNs' sums in ONE packed collective per call).

    Speed: in training and eval the BN of x and the modulation run as one autograd Function (ATen's
    statistics, closed-form backward saving x and γ; :func:`normkit.functional.loan.loan`). The two
    ``k×k`` convs are the paper's and dominate the layer's cost at equal channel counts (about 80% of
    fwd+bwd at 32×64×56×56 with ``cond_channels = 64``), so LOAN's time against a bare BatchNorm measures
    mostly those convs.
    """

    def __init__(
        self,
        num_features: int,
        cond_channels: int | None = None,
        kernel_size: int = 3,
        free_norm: str = "batch",
        eps: float = 1e-5,
        momentum: float = 0.1,
        track_running_stats: bool = True,
        *,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, backend=backend, process_group=process_group)
        if free_norm not in FREE_NORMS:
            raise ValueError(f"LOAN: free_norm must be one of {FREE_NORMS}, got {free_norm!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"LOAN: kernel_size must be a positive odd int, got {kernel_size!r}")
        check_momentum(momentum, "LOAN")
        self.num_features = int(num_features)
        self.cond_channels = int(num_features if cond_channels is None else cond_channels)
        self.kernel_size = kernel_size
        self.free_norm_type = free_norm
        self.eps = float(eps)
        self.momentum = float(momentum)
        kw = {"device": device, "dtype": dtype}
        bn = {"eps": eps, "momentum": momentum, "affine": False, "track_running_stats": track_running_stats, **kw}
        # containers of the running statistics, named as the official module; the math is in functional.loan
        self.free_norm = BatchNorm(self.num_features, **bn) if free_norm == "batch" else None
        self.free_norm_cond = BatchNorm(self.cond_channels, **bn)
        pad = kernel_size // 2
        self.mlp_gamma = nn.Conv2d(self.cond_channels, self.num_features, kernel_size, padding=pad, **kw)
        self.mlp_beta = nn.Conv2d(self.cond_channels, self.num_features, kernel_size, padding=pad, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.mlp_gamma, self.mlp_beta):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)
        for bn in (self.free_norm, self.free_norm_cond):
            if bn is not None:
                bn.reset_running_stats()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError(f"LOAN.forward(x, cond) needs the condition map (N, {self.cond_channels}, *spatial)")
        if not isinstance(x, Tensor) or x.dim() not in (3, 4, 5) or x.shape[1] != self.num_features:
            shape = describe(x)
            raise ValueError(
                f"LOAN expects x of shape (N, {self.num_features}, H, W), (N, {self.num_features}, D, H, W) "
                f"or (N, {self.num_features}, L), got {shape}"
            )
        if not isinstance(cond, Tensor) or cond.dim() < 2 or cond.shape[1] != self.cond_channels:
            shape = describe(cond)
            raise ValueError(f"LOAN expects cond of shape (N, {self.cond_channels}, *spatial), got {shape}")
        stats: dict[str, Tensor | None] = {}
        for prefix, bn in (("", self.free_norm), ("cond_", self.free_norm_cond)):
            if bn is None:
                continue
            if self.training and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            stats[prefix + "running_mean"] = bn.running_mean
            stats[prefix + "running_var"] = bn.running_var
        return loan(
            x,
            cond,
            self.mlp_gamma.weight,
            self.mlp_gamma.bias,
            self.mlp_beta.weight,
            self.mlp_beta.bias,
            **stats,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            free_norm=self.free_norm_type,
            reducer=sync_reducer(self),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, cond_channels={self.cond_channels}, kernel_size={self.kernel_size}"
        if self.free_norm_type != "batch":
            s += f", free_norm={self.free_norm_type!r}"
        return s + f", eps={self.eps}, momentum={self.momentum}"
