"""Normalizer-free building blocks: Scaled WS convolution, gamma-scaled activations, SkipInit.

Brock, De, Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021, arXiv:2101.08692 (NF-ResNets), and Brock, De, Smith,
Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization", 2021,
arXiv:2102.06171 (NFNets). Official code: ``google-deepmind/deepmind-research/nfnets``
(``base.py``: ``WSConv2D``, ``nonlinearities``). SkipInit: De & Smith, "Batch Normalization
Biases Residual Blocks Towards the Identity Function in Deep Networks", 2020, arXiv:2002.10444.
The NF-ResNet block is :class:`normkit.models.nf_resnet.NFBlock`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from normkit.functional._core import check_eps
from normkit.nn.init import lecun_normal_
from normkit.registry import Paper

NF_RESNET_PAPER = Paper(
    "Characterizing signal propagation to close the performance gap in unnormalized ResNets",
    2021,
    "2101.08692",
    "Brock, De, Smith",
)
NFNET_PAPER = Paper(
    "High-Performance Large-Scale Image Recognition Without Normalization",
    2021,
    "2102.06171",
    "Brock, De, Smith, Simonyan",
)
SKIPINIT_PAPER = Paper(
    "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks",
    2020,
    "2002.10444",
    "De, Smith",
)


def scaled_standardize_weight(weight: Tensor, gain: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """Scaled Weight Standardization of the NF-Nets (official ``WSConv2D.standardize_weight``).

    ``Ŵ_o = (W_o − mean(W_o)) · gain_o / sqrt(max(N · var(W_o), eps))`` with the biased variance
    over the fan-in of output unit ``o`` and ``N`` the fan-in (in/groups · kh · kw). eps (1e-4)
    clamps ``N · var`` from below through ``max`` rather than being added. ``gain`` has one value
    per output unit (any shape with ``out`` elements).
    """
    eps = check_eps(eps)
    if weight.dim() < 2:
        raise ValueError(f"scaled_standardize_weight needs a weight of shape (out, in, *kernel), got {tuple(weight.shape)}")
    dims = tuple(range(1, weight.dim()))
    fan_in = weight[0].numel()
    var, mean = torch.var_mean(weight, dims, correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    if gain is not None:
        if gain.numel() != weight.shape[0]:
            raise ValueError(f"gain must have one value per output unit ({weight.shape[0]}), got shape {tuple(gain.shape)}")
        scale = scale * gain.reshape(var.shape)
    return weight * scale - mean * scale


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with the NF-Nets' Scaled Weight Standardization and a learnable gain.

    Brock et al. 2021, arXiv:2101.08692 / 2102.06171, official ``WSConv2D``:
    ``y = conv2d(x, Ŵ) + b``, ``Ŵ_o = (W_o − μ_o) · gain_o / sqrt(max(N·σ²_o, eps))`` with the
    biased σ² over the fan-in, ``N`` = fan-in, eps = 1e-4 (used in ``max``, not added), ``gain``
    initialised to ``gain_init`` (1). At init the weights are LeCun normal, N(0, 1/fan_in), as
    the official VarianceScaling(1.0, 'fan_in', 'normal'); the bias is zeros.

    Differences from the official layer: it *always* adds a bias, even with ``with_bias=False``;
    here ``bias=True`` is the default and ``bias=False`` really drops it. ``gain`` has shape
    ``(out, 1, 1, 1)`` as timm's ``ScaledStdConv2d`` (the official Haiku parameter is ``(out,)``)
    so timm's NF checkpoints' ``gain`` loads; timm itself adds eps inside the sqrt (its default
    eps 1e-6) — this layer keeps the official ``max``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gain_init: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        self.eps = check_eps(eps)
        self.gain_init = float(gain_init)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.gain = nn.Parameter(torch.empty(out_channels, 1, 1, 1, device=device, dtype=dtype))
        self._reset_gain()

    def _reset_gain(self) -> None:
        nn.init.constant_(self.gain, self.gain_init)

    def reset_parameters(self) -> None:
        lecun_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "gain"):
            self._reset_gain()

    def standardized_weight(self) -> Tensor:
        return scaled_standardize_weight(self.weight, self.gain, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gain_init={self.gain_init}, eps={self.eps}"


#: The activations of the official code (``nfnets/base.py``, ``nonlinearities``) as torch functions.
#: ``gelu`` is the tanh approximation, JAX's default (``jax.nn.gelu(approximate=True)``).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "celu": TF.celu,
    "elu": TF.elu,
    "gelu": lambda x: TF.gelu(x, approximate="tanh"),
    "leaky_relu": lambda x: TF.leaky_relu(x, 0.01),
    "log_sigmoid": TF.logsigmoid,
    "relu": TF.relu,
    "relu6": TF.relu6,
    "selu": TF.selu,
    "sigmoid": torch.sigmoid,
    "silu": TF.silu,
    "soft_sign": TF.softsign,
    "softplus": TF.softplus,
    "tanh": torch.tanh,
}

#: γ of each activation g, copied from the official code: ``γ = 1 / sqrt(Var_{z~N(0,1)}[g(z)])``,
#: so ``γ·g(z)`` has unit variance for unit-Gaussian ``z``. The official values are Monte-Carlo
#: estimates (g applied to samples of N(0, 1), biased variance); they exceed the exact value of the
#: Gaussian integral by 0.01–0.09 % (relu: exact 1/sqrt(1/2 − 1/(2π)) = 1.71286, official 1.71396).
#: ``glu`` (1.8484294414520264) and ``log_softmax`` (1.0002083778381348) are in the official table
#: but are not elementwise (they depend on the split/softmax axis), so they are left out here.
GAMMA: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

_ALIASES = {"swish": "silu", "softsign": "soft_sign", "logsigmoid": "log_sigmoid", "linear": "identity"}


def _act_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GAMMA:
        raise ValueError(f"unknown gamma-scaled activation {name!r}; valid names: {', '.join(sorted(GAMMA))}")
    return key


class GammaAct(nn.Module):
    """Gamma-scaled activation ``γ · g(x)`` of the NF-Nets (official ``base.nonlinearities``).

    Brock et al. 2021, arXiv:2101.08692: ``γ`` (:data:`GAMMA`) makes ``γ·g(z)`` unit-variance for
    ``z ~ N(0, 1)``, so a signal of unit variance keeps it through the nonlinearity.
    ``gamma`` overrides the constant (e.g. an exact value from :func:`compute_gamma`).
    """

    def __init__(self, name: str = "relu", *, gamma: float | None = None) -> None:
        super().__init__()
        self.name = _act_name(name)
        self.gamma = GAMMA[self.name] if gamma is None else float(gamma)
        self._fn = ACTIVATIONS[self.name]

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name!r}, gamma={self.gamma}"


def gamma_act(name: str = "relu", *, gamma: float | None = None) -> GammaAct:
    """Build the gamma-scaled activation ``name`` (see :class:`GammaAct`)."""
    return GammaAct(name, gamma=gamma)


def compute_gamma(name: str, num_samples: int = 1 << 22, *, seed: int = 0) -> float:
    """Monte-Carlo estimate of ``γ = 1 / sqrt(Var[g(z)])``, ``z ~ N(0, 1)``, in float64 (as the official constants)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_samples, generator=gen, dtype=torch.float64)
    return float(ACTIVATIONS[_act_name(name)](z).var(correction=0).rsqrt())


class SkipInit(nn.Module):
    """SkipInit: multiply the residual branch by a learnable scalar initialised to 0.

    De & Smith 2020, arXiv:2002.10444: ``x + α·f(x)`` with ``α`` (parameter ``gain``, shape ())
    initialised to ``init`` (0), so every residual block starts as the identity. Used in the
    NF-ResNets' blocks (the official ``skip_gain``). Apply it to the branch output:
    ``out = shortcut + skip(branch(x))``.
    """

    def __init__(self, init: float = 0.0, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.init = float(init)
        self.gain = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gain, self.init)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain

    def extra_repr(self) -> str:
        return f"init={self.init}"
