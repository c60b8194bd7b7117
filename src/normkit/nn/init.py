"""Initialisers used by the normalization-free methods."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fan_in(tensor: Tensor) -> int:
    """Fan-in of a weight: ``in_features`` for ``(out, in)``, ``in/groups · kh · kw`` for ``(out, in/groups, kh, kw)``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise ValueError(f"fan-in needs a weight with at least 2 dims (out, in, *kernel), got shape {tuple(tensor.shape)}")
    return math.prod(tensor.shape[1:])


def lecun_normal_(tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """LeCun normal initialisation in place: ``w ~ N(0, 1 / fan_in)``; returns ``tensor``.

    The initialisation of self-normalizing networks (Klambauer et al. 2017, "Self-Normalizing
    Neural Networks", arXiv:1706.02515): the official code uses TF's
    ``variance_scaling_initializer(factor=1.0, mode='FAN_IN')``, an untruncated normal with
    variance 1/fan_in, i.e. ``torch.nn.init.kaiming_normal_(w, mode='fan_in', nonlinearity='linear')``.
    With it, the pre-activations of a layer fed unit-variance inputs have unit variance.
    Also the initialisation of the NF-Nets' convolutions (VarianceScaling(1, fan_in, normal)).
    """
    if not tensor.is_floating_point():
        raise TypeError(f"lecun_normal_ needs a floating-point tensor, got dtype {tensor.dtype}")
    std = 1.0 / math.sqrt(fan_in(tensor))
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)
