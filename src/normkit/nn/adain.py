"""Adaptive Instance Normalization module (style transfer)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normkit.functional.adain import adain
from normkit.nn._base import check_module_args, describe
from normkit.registry import Paper, register_norm

ADAIN = Paper(
    "Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization",
    2017,
    "1703.06868",
    "Huang, Belongie",
)


def _sample_style(x: Tensor) -> dict[str, Tensor]:
    # another spatial size than the content, to exercise that AdaIN does not need matching sizes
    shape = (x.shape[0], x.shape[1], *(s + 1 for s in x.shape[2:]))
    return {"style": torch.randn(shape, dtype=x.dtype, device=x.device) + 0.5}


@register_norm(
    "adain",
    family="conditional",
    paper=ADAIN,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="instance-normalized content re-scaled with the style's per-channel mean and std",
    aliases=("adaptive_instance_norm",),
    drop_in=False,
    extra_inputs=("style",),
    sample_inputs=_sample_style,
)
class AdaIN(nn.Module):
    """AdaIN with content/style interpolation, ``forward(content, style, alpha=1.0)``.

    Huang & Belongie, ICCV 2017, arXiv:1703.06868:

        AdaIN(c, s) = σ(s) · (c − μ(c)) / sqrt(σ²(c) + eps) + μ(s)
        y = alpha · AdaIN(c, s) + (1 − alpha) · c          (test-time content/style trade-off)

    with per-(sample, channel) spatial statistics. No parameters. Defaults follow the official
    Torch7 code: biased variances, eps (1e-5) only on the content; ``unbiased=True, style_eps=True``
    gives the common PyTorch port. See :func:`normkit.functional.adain.adain`.
    ``num_features`` (C) is only used to validate the inputs.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        unbiased: bool = False,
        style_eps: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_module_args(eps, None)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.unbiased = bool(unbiased)
        self.style_eps = bool(style_eps)

    def forward(self, content: Tensor, style: Tensor | None = None, alpha: float = 1.0) -> Tensor:
        if style is None:
            raise ValueError("AdaIN.forward(content, style) needs the style features (N, C, *spatial)")
        for name, t in (("content", content), ("style", style)):
            if not isinstance(t, Tensor) or t.dim() < 3 or t.shape[1] != self.num_features:
                shape = describe(t)
                raise ValueError(f"AdaIN expects {name} of shape (N, {self.num_features}, *spatial), got {shape}")
        if isinstance(alpha, Tensor) or not (isinstance(alpha, (int, float)) and not math.isnan(alpha) and 0 <= alpha <= 1):
            raise ValueError(f"AdaIN: alpha must be a number in [0, 1], got {alpha!r}")
        y = adain(content, style, self.eps, unbiased=self.unbiased, style_eps=self.style_eps)
        if alpha == 1:
            return y
        return alpha * y + (1 - alpha) * content

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        if self.unbiased:
            s += ", unbiased=True"
        if self.style_eps:
            s += ", style_eps=True"
        return s
