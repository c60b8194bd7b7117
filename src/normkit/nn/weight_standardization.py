"""Weight Standardization (WS) as drop-in ``nn.Conv2d`` / ``nn.Linear`` subclasses.

Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019, arXiv:1903.10520 (v1 titled "Weight Standardization").
Official code: ``joe-siyuan-qiao/WeightStandardization`` (README layer) and
``joe-siyuan-qiao/pytorch-classification`` (``models/layers.py``, the ImageNet GN+WS runs).

Each output unit's weights are standardized before use::

    Ŵ_o = (W_o − mean(W_o)) / σ_o,     mean and σ over the fan-in (in/groups · kh · kw)

with three ``σ`` formulas in the official code, selectable here:

=========================================================  ==============  ==================
official source                                            ``unbiased``    ``eps_placement``
=========================================================  ==============  ==================
WS README (PyTorch), pytorch-classification, DeepLabV3     True            "outside" (default)
BCN repo ``imagenet/models/layers.py``                     True            "inside"
WS README (TensorFlow, ``keras.backend.std``)              False           "outside"
=========================================================  ==============  ==================

"outside": ``σ = std(W_o) + eps``; "inside": ``σ = sqrt(var(W_o) + eps)``; eps = 1e-5. The
default is the README/pytorch-classification layer that produced the paper's ImageNet numbers.
No learnable gain (compare the NF-Nets' :class:`normkit.nn.ScaledStdConv2d`). The paper
advises WS only on layers followed by a normalization layer (GN, BN, BCN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from normkit.functional._core import check_eps
from normkit.nn.replace import replace_modules

EpsPlacement = Literal["outside", "inside"]


def _check_ws_args(eps: float, unbiased: bool, eps_placement: str) -> tuple[float, bool, EpsPlacement]:
    eps = check_eps(eps)
    if eps_placement not in ("outside", "inside"):
        raise ValueError(f"eps_placement must be 'outside' (std + eps) or 'inside' (sqrt(var + eps)), got {eps_placement!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    return eps, unbiased, eps_placement  # type: ignore[return-value]


def standardize_weight(
    weight: Tensor, eps: float = 1e-5, *, unbiased: bool = True, eps_placement: EpsPlacement = "outside"
) -> Tensor:
    """Weight Standardization of a weight ``(out, *fan_in_dims)`` (differentiable).

    ``Ŵ = (W − μ) / σ`` per output unit (dim 0), μ and σ over all other dims;
    ``σ = std + eps`` (``eps_placement="outside"``) or ``sqrt(var + eps)`` ("inside"), with the
    Bessel-corrected (``unbiased=True``, official PyTorch code) or biased variance.
    """
    eps, unbiased, eps_placement = _check_ws_args(eps, unbiased, eps_placement)
    if weight.dim() < 2:
        raise ValueError(f"standardize_weight needs a weight of shape (out, in, *kernel), got {tuple(weight.shape)}")
    dims = tuple(range(1, weight.dim()))
    if unbiased and weight[0].numel() < 2:
        raise ValueError(f"unbiased weight standardization needs a fan-in of at least 2, got weight shape {tuple(weight.shape)}")
    var, mean = torch.var_mean(weight, dims, correction=1 if unbiased else 0, keepdim=True)
    if eps_placement == "outside":
        return (weight - mean) / (var.sqrt() + eps)
    return (weight - mean) * torch.rsqrt(var + eps)


class _WSMixin:
    eps: float
    unbiased: bool
    eps_placement: EpsPlacement

    def _set_ws(self, eps: float, unbiased: bool, eps_placement: str) -> None:
        self.eps, self.unbiased, self.eps_placement = _check_ws_args(eps, unbiased, eps_placement)

    def standardized_weight(self) -> Tensor:
        """The standardized weight the forward pass uses."""
        return standardize_weight(self.weight, self.eps, unbiased=self.unbiased, eps_placement=self.eps_placement)  # type: ignore[attr-defined]

    def _ws_repr(self) -> str:
        return f", ws_eps={self.eps}, unbiased={self.unbiased}, eps_placement={self.eps_placement!r}"


class WSConv2d(_WSMixin, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (Qiao et al. 2019, arXiv:1903.10520).

    ``y = conv2d(x, Ŵ) + b`` with ``Ŵ_o = (W_o − mean(W_o)) / σ_o`` over (in/groups, kh, kw);
    ``σ = std_unbiased + eps`` by default (official PyTorch layer). Arguments are
    ``nn.Conv2d``'s plus keyword-only ``eps`` (1e-5), ``unbiased`` (True) and ``eps_placement``
    ("outside" | "inside"); see the module docstring for which official code uses which.
    Parameters are ``nn.Conv2d``'s (``weight``, ``bias``), so state dicts load both ways.
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
        eps: float = 1e-5,
        unbiased: bool = True,
        eps_placement: EpsPlacement = "outside",
    ) -> None:
        self._set_ws(eps, unbiased, eps_placement)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ws_repr()


class WSLinear(_WSMixin, nn.Linear):
    """``nn.Linear`` with Weight Standardization: ``y = x Ŵᵀ + b``, each row of W standardized.

    Same options as :class:`WSConv2d` (σ over ``in_features``). Parameters are ``nn.Linear``'s.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        eps: float = 1e-5,
        unbiased: bool = True,
        eps_placement: EpsPlacement = "outside",
    ) -> None:
        self._set_ws(eps, unbiased, eps_placement)
        super().__init__(in_features, out_features, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ws_repr()


_WS_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: WSConv2d, nn.Linear: WSLinear}


def weight_standardize_(
    model: nn.Module,
    *,
    types: Iterable[type[nn.Module]] = (nn.Conv2d, nn.Linear),
    exclude: Iterable[str] = (),
    filter: Callable[[str, nn.Module], bool] | None = None,
    eps: float = 1e-5,
    unbiased: bool = True,
    eps_placement: EpsPlacement = "outside",
) -> nn.Module:
    """Turn the ``nn.Conv2d`` / ``nn.Linear`` layers of ``model`` into WS layers in place; returns ``model``.

    Each selected module's class becomes :class:`WSConv2d` / :class:`WSLinear` (its parameters,
    hooks and state-dict keys are untouched, so an optimizer built before keeps working).
    Only modules whose type is *exactly* ``nn.Conv2d`` or ``nn.Linear`` are converted (a subclass
    has its own forward, which WS would override); layers already standardized are skipped.

    Args:
        types: which of ``nn.Conv2d`` / ``nn.Linear`` to convert.
        exclude: qualified module names to leave alone (e.g. ``("fc",)`` for a classifier — the
            paper applies WS only to layers followed by a normalization layer).
        filter: optional ``(name, module) -> bool``; only modules it accepts are converted.
        eps, unbiased, eps_placement: the σ formula (see the module docstring).
    """
    eps, unbiased, eps_placement = _check_ws_args(eps, unbiased, eps_placement)
    types = tuple(types)
    for t in types:
        if t not in _WS_CLASSES:
            raise ValueError(f"weight_standardize_ converts nn.Conv2d and nn.Linear only, got {t!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"weight_standardize_ expects an nn.Module, got {type(model).__name__}")
    skip = set(exclude)

    def match(name: str, m: nn.Module) -> bool:
        return type(m) in types and name not in skip and (filter is None or filter(name, m))

    def build(name: str, m: nn.Module) -> nn.Module:
        m.__class__ = _WS_CLASSES[type(m)]  # a class swap: parameters, hooks and keys stay
        m.eps, m.unbiased, m.eps_placement = eps, unbiased, eps_placement  # type: ignore[assignment]
        return m

    replace_modules(model, match, build)
    return model
