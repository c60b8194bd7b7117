"""ATen's norm ops with their statistics checked for overflow: the ``"native"`` choice of ``"auto"``.

ATen computes float32 (and bfloat16, accumulated in float32) variances in float32: for
``|x − μ|`` past ~1.8e19 the variance overflows to inf, ``rsqrt(inf + eps) = 0``, and the op
silently returns zeros (or NaN) where the math gives a unit-variance output (issue 12). normkit's
own paths do not overflow (:func:`normkit.kernels.canonical.safe_rstd`, the C++ kernels' double
rescue). Each function here runs the same ATen op and autograd node as the ``torch.nn.functional``
call it stands for, through the ``native_*`` entry point that also returns the per-row (per-channel,
per-group) reciprocal std ``r``, and returns **None when min r > 0 fails** — an overflowed row
(r = 0) or a NaN row — so the caller recomputes the call on normkit's path (a NaN input gives NaN
there too, never masked).

The check is a reduction over the statistics plus a host read, ~3 µs per call on the 2-core CPU:
under 1–3% of the op from :data:`ATEN_CHECK_MIN_NUMEL` input elements, but +30–60% on a
64×256 LayerNorm, so smaller inputs run the plain op unchecked (``torch``'s own behaviour; pick
``backend="kernels"`` or ``"eager"`` for overflow-safe statistics at every size). Not checked
either: CUDA tensors (the host read would synchronize the stream on every call) and code under
``torch.compile`` (Inductor lowers these ops with its own decomposition). In ``"auto"``'s table
most small-size ``native`` choices sit below the threshold and most large ones go to normkit's
kernels, so the check runs on LayerNorm, add + LayerNorm and BatchNorm (training) from 2^18
elements, GroupNorm between 2^18 and 2^20, and wherever the kernels cannot take the input
(bfloat16, no compiler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

#: input elements from which the ATen paths on CPU check ATen's statistics for overflow
ATEN_CHECK_MIN_NUMEL = 1 << 18


def checked(x: Tensor) -> bool:
    """Whether this call's ATen statistics are checked (CPU, ≥ :data:`ATEN_CHECK_MIN_NUMEL`, eager)."""
    return x.numel() >= ATEN_CHECK_MIN_NUMEL and x.is_cpu and not torch.compiler.is_compiling()


def finite_stats(r: Tensor) -> bool:
    """Whether ATen's reciprocal std ``r`` (per row/channel/group) shows no overflow: min r > 0.

    An overflowed variance gives r = 0; NaN > 0 is False, so a NaN row also goes to normkit's path
    (which keeps it NaN). One reduction and a host read (~3 µs on CPU).
    """
    return r.numel() == 0 or float(r.detach().amin()) > 0



def layer_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """``F.layer_norm``, or None where ATen's per-row statistics overflowed."""
    if not checked(x):
        return TF.layer_norm(x, shape, weight, bias, eps)
    y, _, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
    return y if finite_stats(rstd) else None


def rms_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, eps: float) -> Tensor | None:
    """``F.rms_norm``, or None where ATen's per-row statistics overflowed."""
    if not checked(x):
        return TF.rms_norm(x, shape, weight, eps)
    y, rstd = torch.ops.aten._fused_rms_norm(x, list(shape), weight, eps)
    return y if finite_stats(rstd) else None


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """``F.group_norm`` (input checked by the caller), or None where a group's statistics overflowed."""
    if not checked(x) or not x.is_contiguous():
        return TF.group_norm(x, num_groups, weight, bias, eps)
    n, c = x.shape[0], x.shape[1]
    y, _, rstd = torch.native_group_norm(x, weight, bias, n, c, x.numel() // max(n * c, 1), num_groups, eps)
    return y if finite_stats(rstd) else None


def batch_norm(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, training: bool, momentum: float, eps: float,
) -> Tensor | None:
    """``F.batch_norm``, or None where a channel's batch statistics overflowed (training only).

    On None the running statistics are as before the call (ATen's in-place update is undone), so
    normkit's path updates them once, from statistics that did not overflow.
    """
    if not training or not checked(x) or x.numel() <= x.shape[1]:  # (≤ 1 value per channel: F's error)
        return TF.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    old = None if running_mean is None or running_var is None else (running_mean.clone(), running_var.clone())
    y, _, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
    if finite_stats(invstd):
        return y
    if old is not None:
        with torch.no_grad():
            running_mean.copy_(old[0])
            running_var.copy_(old[1])
    return None


def instance_norm(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, use_input_stats: bool, momentum: float, eps: float,
) -> Tensor | None:
    """``F.instance_norm``, or None where an instance's statistics overflowed.

    Runs what ATen's ``instance_norm`` runs — BatchNorm over the ``(1, N·C, *)`` view with the
    affine and running buffers repeated per sample — and averages the buffers back over the batch
    only when the statistics are finite.
    """
    if not use_input_stats or not checked(x):
        return TF.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    n, c = x.shape[0], x.shape[1]
    rep = (lambda t: None if t is None else t.repeat(n))  # noqa: E731
    rm, rv = rep(running_mean), rep(running_var)
    y, _, invstd = torch.native_batch_norm(
        x.contiguous().view(1, n * c, *x.shape[2:]), rep(weight), rep(bias), rm, rv, True, momentum, eps
    )
    if not finite_stats(invstd):
        return None
    if rm is not None and rv is not None:
        with torch.no_grad():
            running_mean.copy_(rm.view(n, c).mean(0))
            running_var.copy_(rv.view(n, c).mean(0))
    return y.view(x.shape)
