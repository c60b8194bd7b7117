"""Region Normalization modules: RN-B (external inpainting mask) and RN-L (mask learned from the features)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normkit.functional.region_norm import region_norm_b, region_norm_l
from normkit.nn._base import describe, set_options, sync_reducer
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

REGION_NORM = Paper(
    "Region Normalization for Image Inpainting",
    2020,
    "1911.10375",
    "Yu, Guo, Jin, Wu, Chen, Li, Zhang, Liu",
)


def _random_mask(x: Tensor) -> Tensor:
    """A random binary (N, 1, *spatial) hole mask with both regions non-empty in every sample."""
    n = x.shape[0]
    spatial = tuple(x.shape[2:])
    m = (torch.rand((n, 1, *spatial), device=x.device) < 0.4).to(x.dtype).reshape(n, math.prod(spatial))
    m[:, 0] = 1.0
    if m.shape[1] > 1:
        m[:, -1] = 0.0
    return m.reshape(n, 1, *spatial)


class _SelfAwareAffine(nn.Module):
    """Parameter holder named as the official ``SelfAware_Affine`` (conv1, gamma_conv, beta_conv)."""

    def __init__(self, kernel_size: int, pad: int, kw: dict) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=pad, bias=False, **kw)
        self.gamma_conv = nn.Conv2d(1, 1, kernel_size, padding=pad, **kw)
        self.beta_conv = nn.Conv2d(1, 1, kernel_size, padding=pad, **kw)


class _RegionNorm(nn.Module):
    """What RN-B and RN-L share: the channel count, BatchNorm's eps, the BN-/IN-style switch and the
    process group whose batches the statistics cover; :meth:`_rn_options` hands the last two to the
    functional call. Holds no parameters or buffers (the subclasses' state-dict keys are the official ones)."""

    def __init__(self, num_features: int, eps: float, per_sample: bool, process_group: ProcessGroupLike) -> None:
        super().__init__()
        set_options(self, eps, process_group=process_group)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.per_sample = bool(per_sample)

    def _rn_options(self) -> dict[str, object]:
        return {"per_sample": self.per_sample, "reducer": sync_reducer(self)}

    def _repr_options(self) -> str:
        return ", per_sample=True" if self.per_sample else ""


@register_norm(
    "regionnorm_b",
    family="region",
    paper=REGION_NORM,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=False,
    description="separate per-channel statistics (and affine) for the hole and the valid region of a mask",
    aliases=("rn_b", "rn-b"),
    drop_in=False,
    extra_inputs=("mask",),
    sample_inputs=lambda x: {"mask": _random_mask(x)},
)
class RegionNormB(_RegionNorm):
    """Basic Region Normalization (RN-B), ``forward(x, mask)``.

    Yu et al., "Region Normalization for Image Inpainting", AAAI 2020, arXiv:1911.10375; follows the
    official ``geekyutao/RN`` ``RN_B``. The positions with ``mask == 1`` (the **hole**, "foreground";
    the official pipeline marks holes with 255) and those with ``mask == 0`` are normalized separately,
    each with its own mean and biased variance, then

        y = r·m·(1 + γ_f) + β_f + r·(1 − m)·(1 + γ_b) + β_b

    with ``foreground_gamma/beta`` and ``background_gamma/beta`` per channel, all initialised to 0.
    See :func:`normkit.functional.region_norm.region_normalize` for the statistics and eps handling
    (effective epsilon ``eps·count/S_region``; an empty region gives 0, never NaN).

    Args:
        num_features: channels C.
        eps: BatchNorm eps of the official code (1e-5).
        per_sample: ``False`` (official code): BN-style statistics over batch and space per channel,
            also in eval (no running statistics). ``True``: IN-style per-(sample, channel) statistics,
            as the paper's equations.
        masked_bias: ``False`` (official): both biases are added everywhere. ``True``: each region gets
            its own bias (the paper's per-region affine).

    ``mask``: ``(N, 1, *spatial)`` (bool or float, 1 = hole), resized with ``mode='nearest'`` when its
    spatial size differs from x's, as the official code.

    Speed: with the default backend on a CPU float32/float64 input a binary mask runs normkit's C++
    kernels (``kernels/csrc/region_norm.cpp``: one read of x for both regions' statistics, one write of
    the output; a closed-form backward with one read of ∂y and x and one write of ∂x; saves x, the mask
    and O(N·C) statistics); ``backend="eager"``, other devices and per-channel masks take one autograd
    Function of ATen ops (batched products with the mask matrix, saves x, the centred x and the mask);
    soft masks, ``torch.compile`` and ``process_group`` (one packed collective per call of both
    regions' sums about their previous synced means, no cancellation: :func:`normkit.stats.synced_sums`)
    take the official formula. See :func:`normkit.functional.region_norm._region_affine`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        per_sample: bool = False,
        masked_bias: bool = False,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, per_sample, process_group)
        self.masked_bias = bool(masked_bias)
        kw = {"device": device, "dtype": dtype}
        self.foreground_gamma = nn.Parameter(torch.empty(num_features, **kw))
        self.foreground_beta = nn.Parameter(torch.empty(num_features, **kw))
        self.background_gamma = nn.Parameter(torch.empty(num_features, **kw))
        self.background_beta = nn.Parameter(torch.empty(num_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.foreground_gamma, self.foreground_beta, self.background_gamma, self.background_beta):
            nn.init.zeros_(p)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            raise ValueError("RegionNormB.forward(x, mask) needs the inpainting mask (N, 1, *spatial), 1 = hole")
        if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[1] != self.num_features:
            shape = describe(x)
            raise ValueError(f"RegionNormB expects input (N, {self.num_features}, *spatial), got {shape}")
        return region_norm_b(
            x,
            mask,
            self.foreground_gamma,
            self.foreground_beta,
            self.background_gamma,
            self.background_beta,
            self.eps,
            masked_bias=self.masked_bias,
            **self._rn_options(),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}"
            + self._repr_options()
            + (", masked_bias=True" if self.masked_bias else "")
        )


@register_norm(
    "regionnorm_l",
    family="region",
    paper=REGION_NORM,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=False,
    description="region norm with the region split and a spatial affine predicted from the features",
    aliases=("rn_l", "rn-l"),
)
class RegionNormL(_RegionNorm):
    """Learnable Region Normalization (RN-L), a drop-in ``forward(x)``.

    Yu et al., "Region Normalization for Image Inpainting", AAAI 2020, arXiv:1911.10375; follows the
    official ``RN_L`` / ``SelfAware_Affine``:

        s    = sigmoid(conv7x7([mean_c x, max_c x]))   (``sa.conv1``, no bias)
        γ, β = conv7x7(s), conv7x7(s)                  (``sa.gamma_conv``, ``sa.beta_conv``; 1 channel each)
        m    = (s.detach() ≥ threshold)                hard split, threshold 0.8 as the official default
        y    = RN(x, m)·(1 + γ) + β

    RN is the BN-style region normalization of :class:`RegionNormB` (``per_sample=True`` for IN-style).
    The threshold step is not differentiable and uses the detached map: the gradient reaches
    ``sa.conv1`` only through γ and β, never through the region split. Parameter names match the
    official checkpoint (``sa.conv1.weight``, ``sa.gamma_conv.weight/bias``, ``sa.beta_conv.weight/bias``).

    Initialisation: torch's default ``Conv2d`` init (what the official ``RN_L`` class does).
    ``official_init=True`` applies the official training script's re-initialisation
    (``module_util.initialize_weights(model, scale=0.1)``): Kaiming-normal (fan_in) weights scaled by
    0.1, biases drawn from N(1e-4, 1) (``init.normal_(bias, 0.0001)`` sets the *mean* to 1e-4).

    Accepts ``(N, C, H, W)`` input, or ``(N, C, L)`` treated as ``(N, C, L, 1)``.

    Speed: with the default backend on a CPU float32/float64 input, the channel pooling (mean, max and
    arg-max in one read), the 1-2-channel k×k convolutions and the region normalization run normkit's
    C++ kernels (``kernels/csrc/region_norm.cpp``), and ∂x is written once with the pooling's gradient
    included; autograd saves x plus (N, 1, H, W) maps and O(N·C) statistics. See :class:`RegionNormB`.
    """

    def __init__(
        self,
        num_features: int,
        threshold: float = 0.8,
        eps: float = 1e-5,
        *,
        kernel_size: int = 7,
        per_sample: bool = False,
        official_init: bool = False,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, per_sample, process_group)
        if kernel_size not in (3, 7):
            raise ValueError(f"RegionNormL: kernel_size must be 3 or 7 (as the official SelfAware_Affine), got {kernel_size!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"RegionNormL: threshold must be in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.kernel_size = int(kernel_size)
        self.official_init = bool(official_init)
        kw = {"device": device, "dtype": dtype}
        pad = kernel_size // 2
        self.sa = _SelfAwareAffine(kernel_size, pad, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        convs = (self.sa.conv1, self.sa.gamma_conv, self.sa.beta_conv)
        for conv in convs:
            conv.reset_parameters()
        if self.official_init:
            with torch.no_grad():
                for conv in convs:
                    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
                    conv.weight.mul_(0.1)
                    if conv.bias is not None:
                        nn.init.normal_(conv.bias, 0.0001)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or x.shape[1] != self.num_features:
            shape = describe(x)
            raise ValueError(
                f"RegionNormL expects input (N, {self.num_features}, H, W) or (N, {self.num_features}, L), got {shape}"
            )
        return region_norm_l(
            x,
            self.sa.conv1.weight,
            self.sa.gamma_conv.weight,
            self.sa.gamma_conv.bias,
            self.sa.beta_conv.weight,
            self.sa.beta_conv.bias,
            self.threshold,
            self.eps,
            **self._rn_options(),
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, threshold={self.threshold}, eps={self.eps}"
        if self.kernel_size != 7:
            s += f", kernel_size={self.kernel_size}"
        return s + self._repr_options() + (", official_init=True" if self.official_init else "")
