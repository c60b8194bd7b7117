"""Normalizer-Free ResNets: the pre-activation NF bottleneck block and the network around it.

Brock, De, Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021, arXiv:2101.08692; the NFNets (Brock, De, Smith, Simonyan
2021, arXiv:2102.06171) reuse the block. Official code: ``google-deepmind/deepmind-research/
nfnets/nf_resnet.py`` (``NF_ResNet``, ``NFResBlock``).

Residual block ``h_{i+1} = h_i + α · f_i(h_i / β_i)``: the branch sees its input divided by
``β_i``, the expected standard deviation of ``h_i`` at initialisation, so with variance-preserving
branches (Scaled WS convolutions, gamma-scaled activations) it outputs unit variance and
``Var(h_{i+1}) = Var(h_i) + α²``. At the first (transition) block of a stage the shortcut is a
convolution of the scaled input, so the variance restarts: ``Var = 1 + α²``. The official
bookkeeping (:func:`nf_expected_stds`)::

    expected_std = 1
    for each stage, for each block b:
        β = expected_std                # the block's input is divided by β (official: times 1/expected_std)
        if b == 0: expected_std = 1
        expected_std = sqrt(expected_std² + α²)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from normkit.nn.init import lecun_normal_
from normkit.nn.normalizer_free import GammaAct, ScaledStdConv2d, SkipInit

ConvLayer = Callable[..., nn.Module]


def nf_expected_stds(depths: Sequence[int], alpha: float = 0.2) -> list[float]:
    """Expected std of each block's *input* at initialisation (the block's β), as the official loop."""
    if any(not isinstance(d, int) or d < 0 for d in depths):
        raise ValueError(f"depths must be non-negative ints, got {tuple(depths)!r}")
    stds: list[float] = []
    expected_std = 1.0
    for depth in depths:
        for b in range(depth):
            stds.append(expected_std)
            if b == 0:
                expected_std = 1.0
            expected_std = math.sqrt(expected_std**2 + alpha**2)
    return stds


def nf_output_std(depths: Sequence[int], alpha: float = 0.2) -> float:
    """Expected std of the last block's output (the value the recurrence reaches after all blocks)."""
    stds = nf_expected_stds([*depths, 1], alpha)
    return stds[-1]


class StochasticDepth(nn.Module):
    """Batchwise stochastic depth of the official code (``base.StochDepth``).

    Training: each sample's branch is kept with probability ``1 − rate`` and zeroed otherwise;
    ``scale_by_keep=False`` (official default) does not rescale kept samples by 1/(1 − rate).
    Eval: identity.
    """

    def __init__(self, rate: float, scale_by_keep: bool = False) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.scale_by_keep = bool(scale_by_keep)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype))
        return x * mask / keep if self.scale_by_keep else x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate}, scale_by_keep={self.scale_by_keep}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite of the official code: ``sigmoid(fc1(act(fc0(mean_HW(x)))))`` (a gate, not applied)."""

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.5, activation: nn.Module | None = None) -> None:
        super().__init__()
        hidden = max(1, int(in_ch * se_ratio))
        self.fc0 = nn.Linear(in_ch, hidden)
        self.fc1 = nn.Linear(hidden, out_ch)
        self.act = activation or nn.ReLU()
        for fc in (self.fc0, self.fc1):
            lecun_normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(self.act(self.fc0(x.mean((2, 3)))))
        return torch.sigmoid(h)[:, :, None, None]


class NFBlock(nn.Module):
    """Normalizer-Free pre-activation bottleneck block (official ``NFResBlock``).

    Brock et al. 2021, arXiv:2101.08692::

        out = act(x) / β                         # official: act(x) * beta with beta = 1/expected_std
        shortcut = conv_shortcut(out) if stride > 1 or in_ch != out_ch else x
        out = conv2(act(conv1(act(conv0(out)))))  # 1×1 → k×k (stride) → 1×1, width = out_ch · bottleneck_ratio
        out = 2 · SE(out) · out                   # if use_se
        out = stochastic_depth(out)               # if stochdepth_rate > 0
        out = skip_gain · out                     # SkipInit, scalar initialised to skip_gain_init (0)
        return α · out + shortcut

    ``act`` is a gamma-scaled activation (:class:`normkit.nn.GammaAct`), convolutions are
    Scaled WS (:class:`normkit.nn.ScaledStdConv2d`). ``beta`` is the expected std of the
    block's input (from :func:`nf_expected_stds`); note the official constructor takes its
    inverse (``beta = 1/expected_std``) — here ``beta`` is the std itself and the block divides.

    Divergence: convolutions pad ``k // 2`` on both sides (torch's usual) where the official
    'SAME' padding is asymmetric for strided convs on even inputs.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        beta: float = 1.0,
        alpha: float = 0.2,
        bottleneck_ratio: float = 0.25,
        kernel_size: int = 3,
        activation: str = "relu",
        skip_gain_init: float = 0.0,
        stochdepth_rate: float = 0.0,
        use_se: bool = False,
        se_ratio: float = 0.25,
        conv: ConvLayer = ScaledStdConv2d,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"NFBlock: beta (the expected input std) must be positive, got {beta!r}")
        self.in_ch, self.out_ch = int(in_ch), int(out_ch)
        self.beta, self.alpha = float(beta), float(alpha)
        self.stride = int(stride)
        self.width = max(1, int(out_ch * bottleneck_ratio))
        self.act = GammaAct(activation)
        self.conv0 = conv(in_ch, self.width, 1)
        self.conv1 = conv(self.width, self.width, kernel_size, stride=stride, padding=kernel_size // 2)
        self.conv2 = conv(self.width, out_ch, 1)
        self.use_projection = stride > 1 or in_ch != out_ch
        self.conv_shortcut = conv(in_ch, out_ch, 1, stride=stride) if self.use_projection else None
        self.se = SqueezeExcite(out_ch, out_ch, se_ratio) if use_se else None
        self.stoch_depth = StochasticDepth(stochdepth_rate) if 0.0 < stochdepth_rate < 1.0 else None
        self.skip = SkipInit(skip_gain_init)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(x) / self.beta
        shortcut = self.conv_shortcut(out) if self.conv_shortcut is not None else x
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        out = self.conv2(self.act(out))
        if self.se is not None:
            out = 2 * self.se(out) * out
        if self.stoch_depth is not None:
            out = self.stoch_depth(out)
        return self.skip(out) * self.alpha + shortcut

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}, beta={self.beta:.4g}, alpha={self.alpha}"


def nf_stages(
    in_ch: int,
    widths: Sequence[int],
    depths: Sequence[int],
    strides: Sequence[int] = (1, 2, 2, 2),
    *,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.0,
    **block_kwargs: object,
) -> nn.Sequential:
    """The NF-ResNet body: blocks with β from the variance recurrence and linearly growing stochastic depth.

    Block ``i`` of ``n`` gets ``beta = nf_expected_stds(depths, alpha)[i]`` and stochastic-depth rate
    ``stochdepth_rate · i / n`` (official). ``block_kwargs`` go to every :class:`NFBlock`.
    """
    if not (len(widths) == len(depths) == len(strides)):
        raise ValueError(f"widths, depths and strides need one entry per stage, got {len(widths)}, {len(depths)}, {len(strides)}")
    stds = nf_expected_stds(depths, alpha)
    n = len(stds)
    blocks: list[nn.Module] = []
    ch, index = in_ch, 0
    for width, depth, stride in zip(widths, depths, strides):
        for b in range(depth):
            blocks.append(
                NFBlock(
                    ch,
                    width,
                    stride=stride if b == 0 else 1,
                    beta=stds[index],
                    alpha=alpha,
                    stochdepth_rate=stochdepth_rate * index / n,
                    **block_kwargs,  # type: ignore[arg-type]
                )
            )
            ch = width
            index += 1
    return nn.Sequential(*blocks)


class NFResNet(nn.Module):
    """Normalizer-Free pre-activation ResNet (official ``NF_ResNet``), configurable and small-able.

    Stem: Scaled WS 7×7/2 conv (``stem_width`` = 16 · width multiplier officially) → 3×3/2 max-pool.
    Body: :func:`nf_stages` (official widths ``[64, 128, 256, 512] × 4``, depths ``(3, 4, 6, 3)`` for
    NF-ResNet-50, α = 0.2, stochastic depth 0.1). Head: ``act`` → global average pool → dropout →
    Linear with weights ``N(0, 0.01²)`` and zero bias. The official default ``drop_rate=None``
    reads a missing key (a bug); here it defaults to 0.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        depths: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (256, 512, 1024, 2048),
        stem_width: int = 64,
        in_chans: int = 3,
        alpha: float = 0.2,
        activation: str = "relu",
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.0,
        skip_gain_init: float = 0.0,
        use_se: bool = False,
        se_ratio: float = 0.25,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if small_input:
            self.stem = ScaledStdConv2d(in_chans, stem_width, 3, stride=1, padding=1)
            self.pool: nn.Module = nn.Identity()
        else:
            self.stem = ScaledStdConv2d(in_chans, stem_width, 7, stride=2, padding=3)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.blocks = nf_stages(
            stem_width,
            widths,
            depths,
            (1,) + (2,) * (len(depths) - 1),
            alpha=alpha,
            stochdepth_rate=stochdepth_rate,
            activation=activation,
            skip_gain_init=skip_gain_init,
            use_se=use_se,
            se_ratio=se_ratio,
        )
        self.expected_stds = nf_expected_stds(depths, alpha)
        self.act = GammaAct(activation)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(widths[-1], num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.pool(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.act(self.forward_features(x)).mean((2, 3))))
