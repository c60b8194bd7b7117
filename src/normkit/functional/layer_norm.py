"""Per-token norms: LayerNorm and RMSNorm (channels-last and channels-first), fused add + norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional import aten as _aten
from normkit.functional._core import (
    canonical_mask,
    check_channels_first,
    check_eps,
    check_float,
    check_param,
    normalize_view,
    trailing_numel,
    with_offset,
)


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if normalized_shape.__class__ is tuple:  # the modules' case, on every call
        return normalized_shape
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)


def _rows(x: Tensor, normalized_shape: int | Sequence[int], what: str) -> tuple[tuple[int, ...], int]:
    check_float(x)
    shape = _shape(normalized_shape)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{what} over normalized_shape={list(shape)} expects input of shape (*, {', '.join(map(str, shape))}), "
            f"got {tuple(x.shape)}"
        )
    d = 1
    for s in shape:
        d *= s
    return shape, d


# the checked ATen calls live in normkit.functional.aten; these names stay for existing imports
ATEN_CHECK_MIN_NUMEL = _aten.ATEN_CHECK_MIN_NUMEL
aten_layer_norm = _aten.layer_norm


def _default_rms_eps(eps: float | None, x: Tensor) -> float:
    return torch.finfo(x.dtype).eps if eps is None else check_eps(eps)


def _token_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
    what: str,
    *,
    residual: Tensor | None = None,
    weight_offset: float = 0.0,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[Tensor, ...]:
    _, d = _rows(x, normalized_shape, what)
    check_param(weight, d, "weight", what)
    check_param(bias, d, "bias", what)
    view = (-1, 1, d, 1)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{what}: residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    out = normalize_view(
        x.reshape(view),
        with_offset(weight, weight_offset),
        bias,
        (2,),
        center=center,
        eps=eps,
        residual=None if residual is None else residual.reshape(view),
        mask=canonical_mask(mask, x, view),
        stats_dtype=stats_dtype,
        backend=backend,
    )
    return tuple(t.reshape(x.shape) for t in out[: 1 if residual is None else 2])


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Layer Normalization over the trailing ``normalized_shape`` dims.

    Ba, Kiros & Hinton, "Layer Normalization", 2016, arXiv:1607.06450::

        y = (x − mean(x)) / sqrt(var(x) + eps) · (weight_offset + w) + b      (biased var)

    ``mask`` (bool, broadcastable to ``x``) restricts the statistics to the True positions.
    """
    eps = check_eps(eps)
    impl = _backend.resolve(backend, x, "layer_norm", mask is None and stats_dtype is None)
    if impl == "native":  # the hot path of the default backend: kept to a few Python operations
        shape = _shape(normalized_shape)
        try:
            y = _aten.layer_norm(x, shape, weight + weight_offset if weight_offset else weight, bias, eps)
        except RuntimeError:  # ATen rejected the input: raise normkit's error for it instead, if it has one
            _token_norm(x, shape, weight, bias, eps, True, "layer_norm", backend="eager")
            raise
        if y is not None:
            return y
        impl = "kernels"  # ATen's statistics overflowed: normkit's do not
    check_float(x)
    return _token_norm(
        x, normalized_shape, weight, bias, eps, True, "layer_norm",
        weight_offset=weight_offset, mask=mask, stats_dtype=stats_dtype, backend=impl,
    )[0]


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    bias: Tensor | None = None,
    weight_offset: float = 0.0,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Root Mean Square Layer Normalization over the trailing ``normalized_shape`` dims.

    Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019, arXiv:1910.07467::

        y = x / sqrt(mean(x²) + eps) · (weight_offset + w) [+ b]

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as ``torch.nn.functional.rms_norm``.
    """
    check_float(x)
    eps = _default_rms_eps(eps, x)
    impl = _backend.resolve(backend, x, "rms_norm", mask is None and stats_dtype is None and bias is None)
    if impl == "native":
        shape = _shape(normalized_shape)
        try:
            y = _aten.rms_norm(x, shape, weight + weight_offset if weight_offset else weight, eps)
        except RuntimeError:  # ATen rejected the input: raise normkit's error for it instead, if it has one
            _token_norm(x, shape, weight, None, eps, False, "rms_norm", backend="eager")
            raise
        if y is not None:
            return y
        impl = "kernels"  # ATen's statistics overflowed: normkit's do not
    return _token_norm(
        x, normalized_shape, weight, bias, eps, False, "rms_norm",
        weight_offset=weight_offset, mask=mask, stats_dtype=stats_dtype, backend=impl,
    )[0]


def add_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | None = None,
    *,
    norm: str = "layernorm",
    weight_offset: float = 0.0,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + norm for pre-norm blocks: returns ``(norm(x + residual), x + residual)``.

    ``norm`` is ``"layernorm"`` (eps default 1e-5) or ``"rmsnorm"`` (eps default finfo eps).
    The sum is formed inside the kernel and only the sum and per-row statistics are saved.
    """
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"add_norm: norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
    check_float(x)
    center = norm == "layernorm"
    eps = (1e-5 if eps is None else check_eps(eps)) if center else _default_rms_eps(eps, x)
    impl = _backend.resolve(backend, x, "add_norm", stats_dtype is None and (center or bias is None))
    if impl == "native":
        if residual.shape != x.shape:  # x + residual would broadcast where normkit's kernel refuses
            raise ValueError(f"add_norm: residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        shape = _shape(normalized_shape)
        w = with_offset(weight, weight_offset)
        try:
            s = x + residual
            y = _aten.layer_norm(s, shape, w, bias, eps) if center else _aten.rms_norm(s, shape, w, eps)
        except RuntimeError:  # ATen rejected the input: raise normkit's error for it instead, if it has one
            _token_norm(x, shape, weight, bias, eps, center, "add_norm", residual=residual, backend="eager")
            raise
        if y is not None:
            return y, s
        impl = "kernels"  # ATen's statistics overflowed: normkit's do not
    y, s = _token_norm(
        x, normalized_shape, weight, bias, eps, center, "add_norm",
        residual=residual, weight_offset=weight_offset, stats_dtype=stats_dtype, backend=impl,
    )
    return y, s


def _channels_first_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
    what: str,
    weight_offset: float,
    mask: Tensor | None,
    stats_dtype: torch.dtype | None,
    backend: str | None,
) -> Tensor:
    c = check_channels_first(x, None if weight is None else weight.numel(), what)
    check_param(bias, c, "bias", what)
    if mask is None and not x.is_contiguous():
        xt = x.movedim(1, -1)
        if xt.is_contiguous():  # channels_last memory: rows of C values, the row norm's path (and its y layout)
            if center:
                y = layer_norm(xt, (c,), weight, bias, eps, weight_offset=weight_offset, stats_dtype=stats_dtype,
                               backend=backend)
            else:
                y = rms_norm(xt, (c,), weight, eps, bias=bias, weight_offset=weight_offset, stats_dtype=stats_dtype,
                             backend=backend)
            return y.movedim(-1, 1)
    native_ok = mask is None and stats_dtype is None and (center or bias is None)
    impl = _backend.resolve(backend, x, "layer_norm2d" if center else "rms_norm2d", native_ok)
    w = with_offset(weight, weight_offset)
    if impl == "native":  # what a user writes without normkit (timm's LayerNorm2d): two transposes
        xt = x.movedim(1, -1)
        y = _aten.layer_norm(xt, (c,), w, bias, eps) if center else _aten.rms_norm(xt, (c,), w, eps)
        if y is not None:
            return y.movedim(-1, 1)
        impl = "kernels"  # ATen's statistics overflowed: normkit's do not
    view = (x.shape[0], 1, c, trailing_numel(x))
    y = normalize_view(  # y in (N, L, C) memory where the kernels run (see channels_first_kernels)
        x.reshape(view), w, bias, (2,), center=center, eps=eps,
        mask=canonical_mask(mask, x, view), stats_dtype=stats_dtype, backend=impl, nlc_out=True,
    )[0]
    return y.reshape(x.shape)


def channels_first_kernels(x: Tensor, c: int, weight: Tensor | None, bias: Tensor | None, eps: float, center: bool) -> Tensor:
    """LayerNorm2d / RMSNorm2d of a channels-first ``(N, C, *)`` input (C = ``c``, validated by the caller)
    on normkit's C++ kernels: what :func:`layer_norm2d` / :func:`rms_norm2d` run on ``"auto"`` once
    :func:`normkit.backend.kernels_apply` holds from the table's size, without their checks and
    resolution (the modules' fast path; inside ``torch.compile`` the kernels' torch operators).

    The output has timm's LayerNorm2d strides: ``(N, *, C)`` memory (channels_last for 4-D input),
    written so by the kernel, so the convolutions of a ConvNeXt block after it run channels_last with
    no copy either way (a channels-last gradient is read in place too). With an NCHW output they ran
    NCHW: ``normkit models`` measured a small ConvNeXt's eager train step at 1.33× torch's; now ~1.0×.
    """
    view = (x.shape[0], 1, c, trailing_numel(x))
    return normalize_view(x.reshape(view), weight, bias, (2,), center=center, eps=eps, backend="kernels",
                          nlc_out=True)[0].reshape(x.shape)


def layer_norm2d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm over the channel dim of a channels-first ``(N, C, *)`` tensor (as timm's LayerNorm2d).

    Equal to ``layer_norm(x.movedim(1, -1), C).movedim(-1, 1)`` without the two transposes' copies.

    Output layout: the same strides as timm's LayerNorm2d (``permute → F.layer_norm → permute``):
    channels-last memory for an NCHW input, ``(N, *, C)`` memory in general. normkit's C++ kernel
    writes it directly and its backward reads a channels-last gradient in place, so convolutions
    next to it run channels_last with no copy (as in timm); an input already in channels-last memory
    runs as rows of C values (:func:`layer_norm`'s path, no copy) and stays so. This holds on the
    fast paths (``"auto"``, ``"native"``, ``"kernels"``, ``"compiled"``); the reference paths
    (``"eager"``, ``"inductor"``, a ``mask``) return x's layout.
    """
    return _channels_first_norm(
        x, weight, bias, check_eps(eps), True, "layer_norm2d", weight_offset, mask, stats_dtype, backend
    )


def rms_norm2d(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    bias: Tensor | None = None,
    weight_offset: float = 0.0,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """RMSNorm over the channel dim of a channels-first ``(N, C, *)`` tensor.

    Equal to ``rms_norm(x.movedim(1, -1), C).movedim(-1, 1)`` without the two transposes' copies (timm's
    current ``RmsNorm2d`` computes the same values by a reduction over dim 1, in x's layout).

    Output layout: the same strides as timm's LayerNorm2d (``permute → F.rms_norm → permute`` here):
    channels-last memory for an NCHW input, ``(N, *, C)`` memory in general. normkit's C++ kernel
    writes it directly and its backward reads a channels-last gradient in place, so convolutions
    next to it run channels_last with no copy (as in timm); an input already in channels-last memory
    runs as rows of C values (:func:`rms_norm`'s path, no copy) and stays so. This holds on the
    fast paths (``"auto"``, ``"native"``, ``"kernels"``, ``"compiled"``); the reference paths
    (``"eager"``, ``"inductor"``, a ``mask``; ``"native"`` with a ``bias``, which ATen's op lacks)
    return x's layout.
    """
    return _channels_first_norm(
        x, weight, bias, _default_rms_eps(eps, x), False, "rms_norm2d", weight_offset, mask, stats_dtype, backend
    )
