"""Norms without per-channel moments: ScaleNorm (one L2 norm per token) and DyT (no statistics)."""

from __future__ import annotations

from torch import Tensor

from normkit.functional._core import check_eps, check_float
from normkit.kernels import pointwise as _kernels


def scale_norm(
    x: Tensor, scale: Tensor, eps: float = 1e-5, *, dim: int = -1, backend: str | None = None
) -> Tensor:
    """ScaleNorm: ``y = g · x / max(‖x‖₂, eps)`` over ``dim`` (default the last), one learned scalar ``g``.

    Nguyen & Salazar, "Transformers without Tears: Improving the Normalization of
    Self-Attention", 2019, arXiv:1910.05895. The clamp (not ``+ eps``) follows the official code.
    ``dim=1`` normalizes the channels of a channels-first ``(N, C, *)`` tensor (ScaleNorm2d).
    """
    check_float(x)
    eps = check_eps(eps)
    if x.dim() < 1 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"scale_norm over dim {dim} expects an input with that dim, got shape {tuple(x.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"scale_norm: scale must be a single value, got shape {tuple(scale.shape)}")
    return _kernels.scale_norm(x, scale, eps, backend, dim)


def dyt(
    x: Tensor,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channels_last: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Dynamic Tanh, a normalization-free drop-in for LayerNorm: ``y = w · tanh(α·x) + b``.

    Zhu, Chen, He, LeCun & Liu, "Transformers without Normalization", 2025, arXiv:2503.10622.
    ``α`` is one learned scalar; ``w``/``b`` are per-channel (last dim, or dim 1 when
    ``channels_last=False``). No statistics: identical in train and eval, batch-independent.
    """
    check_float(x)
    if alpha.numel() != 1:
        raise ValueError(f"dyt: alpha must be a single value, got shape {tuple(alpha.shape)}")
    if x.dim() < (1 if channels_last else 2):
        want = "(*, C)" if channels_last else "(N, C, *) with channels_last=False"
        raise ValueError(f"dyt expects input of shape {want}, got {tuple(x.shape)}")
    c = x.shape[-1] if channels_last else x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.numel() != c:
            layout = "last dim" if channels_last else "dim 1"
            raise ValueError(f"dyt: {name} has {p.numel()} elements but the input's {layout} has {c} channels")
    return _kernels.dyt(x, alpha, weight, bias, channels_last, backend)
