"""EvoNorm-B0 / EvoNorm-S0 modules (normalization and activation in one layer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.functional._core import check_channels_first, check_momentum
from normkit.functional.evonorm import evonorm_b0, evonorm_s0
from normkit.nn._base import group_sample_kwargs, options_repr, set_options, sync_reducer
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

EVONORM = Paper("Evolving Normalization-Activation Layers", 2020, "2004.02967", "Liu, Brock, Simonyan, Le")


def _resolve_groups(num_channels: int, num_groups: int, group_size: int | None, shrink: bool) -> int:
    if group_size is not None:
        if not isinstance(group_size, int) or group_size <= 0 or num_channels % group_size:
            raise ValueError(f"EvoNormS0: group_size={group_size!r} must be a positive divisor of num_channels={num_channels}")
        return num_channels // group_size
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"EvoNormS0: num_groups must be a positive int, got {num_groups!r}")
    if shrink:
        # TF's _group_std: lower the group count until it divides C
        g = num_groups
        while g > 1 and num_channels % g:
            g -= 1
        return g
    if num_channels % num_groups:
        raise ValueError(
            f"EvoNormS0: num_groups={num_groups} must divide num_channels={num_channels} "
            "(pass shrink_groups=True for TF's rule of lowering it until it divides)"
        )
    return num_groups


class _EvoNormBase(nn.Module):
    def __init__(self, num_features: int, apply_act: bool, zero_init: bool, device, dtype) -> None:  # noqa: ANN001
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.apply_act = bool(apply_act)
        self.zero_init = bool(zero_init)
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_features, **kw))
        # as in TF (and timm), v exists only when the nonlinearity is on
        self.v = nn.Parameter(torch.empty(num_features, **kw)) if apply_act else None

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.zero_init else nn.init.ones_)(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def _check(self, x: Tensor, need_spatial: bool) -> None:
        check_channels_first(x, self.num_features, type(self).__name__)
        if need_spatial and self.apply_act and x.dim() < 3:
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.num_features}, *spatial) input, got shape {tuple(x.shape)}"
            )


@register_norm(
    "evonorm_b0",
    family="norm-activation",
    paper=EVONORM,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="x / max(batch std, v·x + instance std) · γ + β: BN-ReLU replacement found by evolution",
    aliases=("evonormb0",),
)
class EvoNormB0(_EvoNormBase):
    """EvoNorm-B0 (Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", 2020, arXiv:2004.02967).

    A normalization *and* activation layer (use it in place of BN-ReLU)::

        y = x / max(sqrt(Var_B + eps), v·x + sqrt(Var_I + eps)) · γ + β

    ``Var_B`` is the biased variance over (N, *spatial) per channel in training (gradients flow
    through it) and ``running_var`` in eval; ``Var_I`` is the per-sample, per-channel variance
    over the spatial dims. ``running_var ← (1 − momentum)·running_var + momentum·Var_B``.

    Defaults follow the official TF code (``tensorflow/tpu`` ``resnet_model.evonorm``):
    eps 1e-5, momentum 0.1 (TF ``decay=0.9``), biased running variance initialised to ones,
    γ = 1 (``zero_init=True`` gives TF's ``init_zero``, used on the last norm of residual
    blocks), β = 0, v = 1.

    ``apply_act=False`` is TF's ``nonlinearity=False``: the layer is **affine only**,
    ``y = x·γ + β``, with no normalization (the official ResNets use it on the last norm of
    each residual block and on projection shortcuts). ``v`` is then absent (as in TF/timm);
    ``running_var`` stays registered but is never updated.

    Differences to timm's ``EvoNorm2dB0`` (same parameter names ``weight``, ``bias``, ``v``,
    ``running_var``, all shaped (C,), so timm state dicts load directly):

    * timm's default ``eps`` is 1e-3 (pass ``eps=1e-3``);
    * timm stores the *unbiased* batch variance in ``running_var`` (``unbiased_running_var=True``);
    * timm only accepts 4-D input; here any (N, C, *spatial) with at least one spatial dim.

    ``process_group`` synchronizes ``Var_B`` over the processes in training (:mod:`normkit.sync`): one
    collective of ``(n, Σ(x−K), Σ(x−K)²)`` per call about ``K`` = the previous synced batch mean (equal on every
    rank; the first call computes the exact global mean first), so no ``E[x²] − E[x]²`` cancellation
    (:func:`normkit.stats.synced_sums`).

    TF → normkit keys: ``gamma → weight``, ``beta → bias``, ``v → v``,
    ``moving_variance → running_var`` (reshape (1, C, 1, 1) → (C,)).
    """

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
        *,
        zero_init: bool = False,
        unbiased_running_var: bool = False,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend, process_group=process_group)
        momentum = check_momentum(momentum, "EvoNormB0")
        super().__init__(num_features, apply_act, zero_init, device, dtype)
        self.momentum = momentum
        self.eps = float(eps)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, need_spatial=True)
        return evonorm_b0(
            x,
            self.running_var,
            self.weight,
            self.bias,
            self.v,
            self.training,
            self.momentum,
            self.eps,
            apply_act=self.apply_act,
            unbiased_running_var=self.unbiased_running_var,
            reducer=sync_reducer(self),
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, apply_act={self.apply_act}, momentum={self.momentum}, eps={self.eps}"
        if self.zero_init:
            s += ", zero_init=True"
        if self.unbiased_running_var:
            s += ", unbiased_running_var=True"
        return s + options_repr(self)


@register_norm(
    "evonorm_s0",
    family="norm-activation",
    paper=EVONORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="x·sigmoid(v·x) / group std · γ + β: batch-independent BN-ReLU replacement found by evolution",
    aliases=("evonorms0",),
    sample_kwargs=group_sample_kwargs,
)
class EvoNormS0(_EvoNormBase):
    """EvoNorm-S0 (Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", 2020, arXiv:2004.02967).

    A batch-independent normalization *and* activation layer (use it in place of BN-ReLU)::

        y = x · sigmoid(v·x) / sqrt(Var_G(x) + eps) · γ + β

    with ``Var_G`` the biased variance of each sample over its group of C/G channels and the
    spatial dims (the swish-like numerator is SiLU when v = 1). Identical in train and eval.

    Defaults follow the official TF code: ``num_groups=32``, eps 1e-5, γ = 1 (``zero_init=True``
    for TF's ``init_zero``), β = 0, v = 1. As in TF, when ``num_groups`` does not divide C it is
    lowered until it does (``shrink_groups=True``; the effective count is ``self.num_groups``);
    ``shrink_groups=False`` raises instead (timm asserts). ``group_size`` (timm) fixes C/G instead.

    ``apply_act=False`` is TF's ``nonlinearity=False``: **affine only**, ``y = x·γ + β`` with no
    normalization, and no ``v`` parameter (timm's ``EvoNorm2dS0`` does the same; timm's
    ``EvoNorm2dS0a`` — eps 1e-3, normalizes even without the activation — is a timm variant,
    not the paper's).

    Differences to timm's ``EvoNorm2dS0`` (same keys ``weight``, ``bias``, ``v``, shaped (C,)):
    the group count is asserted instead of lowered, the argument is ``groups`` instead of
    ``num_groups``, and only 4-D input is accepted.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        eps: float = 1e-5,
        *,
        shrink_groups: bool = True,
        zero_init: bool = False,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        super().__init__(num_features, apply_act, zero_init, device, dtype)
        self.num_groups = _resolve_groups(num_features, num_groups, group_size, shrink_groups)
        self.eps = float(eps)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, need_spatial=False)
        return evonorm_s0(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.v,
            self.eps,
            apply_act=self.apply_act,
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, num_groups={self.num_groups}, apply_act={self.apply_act}, eps={self.eps}"
        if self.zero_init:
            s += ", zero_init=True"
        return s + options_repr(self)
