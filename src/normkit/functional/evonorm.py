"""EvoNorm-B0 and EvoNorm-S0 over channels-first ``(N, C, *spatial)`` input.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", 2020, arXiv:2004.02967.
The math follows the official TensorFlow code (``tensorflow/tpu``,
``models/official/resnet/resnet_model.py``: ``evonorm``, ``_batch_std``, ``_instance_std``,
``_group_std``); the module docstrings in :mod:`normkit.nn.evonorm` list the differences to timm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional._core import channel_view, check_channels_first, check_eps, check_momentum, check_param, trailing_numel
from normkit.stats import Reducer, accumulation_dtype, moments


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * channel_view(weight, y).to(y.dtype)
    if bias is not None:
        y = y + channel_view(bias, y).to(y.dtype)
    return y


def _b0_math(
    x: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    v: Tensor,
    training: bool,
    eps: float,
    stats_dtype: torch.dtype | None,
    reducer: Reducer | None = None,
) -> tuple[Tensor, Tensor]:
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xf = x.to(sd)
    spatial = tuple(range(2, x.dim()))
    if training:  # gradients flow through the batch variance (as in TF); synchronized with a reducer
        var_b = moments(xf, (0, *spatial), reducer=reducer).var
    else:
        var_b = channel_view(running_var, xf).to(sd)
    left = torch.sqrt(var_b + eps)
    right = channel_view(v, xf).to(sd) * xf + torch.sqrt(moments(xf, spatial).var + eps)
    y = _affine(xf / torch.maximum(left, right), weight, bias)
    return y.to(x.dtype), var_b


def evonorm_b0(
    x: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    apply_act: bool = True,
    unbiased_running_var: bool = False,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """EvoNorm-B0, the batch-dependent EvoNorm (Liu et al. 2020, arXiv:2004.02967).

    With ``apply_act=True``::

        s_B = sqrt(Var_{N,*}(x) + eps)            training: batch variance (biased, with gradient)
            = sqrt(running_var + eps)             eval
        s_I = sqrt(Var_{*}(x) + eps)              per sample and channel, over the spatial dims
        y   = x / max(s_B, v·x + s_I) · γ + β

    In training, ``running_var`` (if given) is updated in place with torch's momentum
    convention ``r ← (1 − momentum)·r + momentum·Var_B`` (TF's ``decay=0.9`` is ``momentum=0.1``),
    with the *biased* batch variance as the official code; ``unbiased_running_var=True`` stores
    the Bessel-corrected variance instead (timm's ``EvoNorm2dB0``).

    ``apply_act=False`` reproduces the official ``nonlinearity=False``: **no normalization**,
    just ``y = x·γ + β`` (``v`` and ``running_var`` are unused and not updated).

    ``reducer`` (training only) makes ``Var_B`` the variance of the whole distributed batch
    (:mod:`normkit.sync`; the exact two-pass form, two collectives: B0 keeps no running mean to
    shift the sums by); ``Var_I`` is per sample and stays local.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None if running_var is None else running_var.numel(), "evonorm_b0")
    check_param(weight, c, "weight", "evonorm_b0")
    check_param(bias, c, "bias", "evonorm_b0")
    if not apply_act:
        return _affine(x, weight, bias)
    if x.dim() < 3:
        raise ValueError(f"evonorm_b0 expects (N, C, *spatial) input with at least 3 dims, got shape {tuple(x.shape)}")
    if v is None:
        raise ValueError("evonorm_b0 with apply_act=True needs the per-channel parameter v")
    check_param(v, c, "v", "evonorm_b0")
    momentum = check_momentum(momentum, "evonorm_b0")
    if not training and running_var is None:
        raise ValueError("evonorm_b0 in eval mode (training=False) needs running_var")
    if training and x.numel() // c <= 1 and reducer is None:
        raise ValueError(f"evonorm_b0: expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    n = x.numel() // c
    if reducer is not None and training:
        y, var_b = _b0_math(x, running_var, weight, bias, v, True, eps, stats_dtype, reducer)
        if unbiased_running_var:  # the global count: one more (tiny) sum, only for timm's convention
            n = reducer(torch.tensor([float(n)], dtype=var_b.dtype, device=x.device))
    else:
        impl = _backend.resolve(backend, x, "evonorm")
        key = ("b0", bool(training), eps, stats_dtype, x.dtype, weight is not None, bias is not None)
        y, var_b = _backend.executor(impl, _b0_math, key)(x, running_var, weight, bias, v, bool(training), eps, stats_dtype)
    if training and running_var is not None:
        with torch.no_grad():
            new = var_b.detach().reshape(c)
            if unbiased_running_var:
                new = new * (n / (n - 1))
            running_var.lerp_(new.to(running_var.dtype), momentum)
    return y


def _s0_math(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    v: Tensor,
    eps: float,
    stats_dtype: torch.dtype | None,
) -> Tensor:
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xf = x.to(sd)
    n, c = x.shape[:2]
    xg = xf.reshape(n, num_groups, c // num_groups, trailing_numel(x))
    std = torch.sqrt(moments(xg, (2, 3)).var + eps)
    den = std.expand(xg.shape).reshape(x.shape)
    y = xf * torch.sigmoid(channel_view(v, xf).to(sd) * xf) / den
    return _affine(y, weight, bias).to(x.dtype)


def evonorm_s0(
    x: Tensor,
    num_groups: int = 32,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    eps: float = 1e-5,
    *,
    apply_act: bool = True,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """EvoNorm-S0, the batch-independent EvoNorm (Liu et al. 2020, arXiv:2004.02967).

    With ``apply_act=True``::

        s_G = sqrt(Var_{C/G, *}(x) + eps)          per sample, over each group of C/G channels and the spatial dims
        y   = x · sigmoid(v·x) / s_G · γ + β

    ``num_groups`` must divide C here (the module :class:`normkit.nn.evonorm.EvoNormS0` applies
    TF's rule of lowering the default of 32 until it divides C). ``apply_act=False`` is the
    official ``nonlinearity=False``: **no normalization**, ``y = x·γ + β``. Train and eval agree.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "evonorm_s0")
    check_param(weight, c, "weight", "evonorm_s0")
    check_param(bias, c, "bias", "evonorm_s0")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"evonorm_s0: num_groups={num_groups!r} must be a positive divisor of the {c} channels")
    if not apply_act:
        return _affine(x, weight, bias)
    if v is None:
        raise ValueError("evonorm_s0 with apply_act=True needs the per-channel parameter v")
    check_param(v, c, "v", "evonorm_s0")
    impl = _backend.resolve(backend, x, "evonorm")
    key = ("s0", num_groups, eps, stats_dtype, x.dtype, weight is not None, bias is not None)
    return _backend.executor(impl, _s0_math, key)(x, num_groups, weight, bias, v, eps, stats_dtype)
