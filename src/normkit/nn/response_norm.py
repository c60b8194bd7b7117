"""Filter Response Normalization (+TLU) and Global Response Normalization modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.functional._core import check_channels_first
from normkit.functional.response_norm import filter_response_norm, global_response_norm
from normkit.nn._base import options_repr, set_options
from normkit.registry import Paper, register_norm

FRN = Paper(
    "Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural Networks",
    2019,
    "1911.09737",
    "Singh, Krishnan",
)
CONVNEXT_V2 = Paper(
    "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders",
    2023,
    "2301.00808",
    "Woo, Debnath, Hu, Chen, Liu, Kweon, Xie",
)


class _ResponseNorm(nn.Module):
    """What FRN and GRN share: validated ``num_features`` and ``eps``, the options, and per-channel
    ``weight`` (γ) / ``bias`` (β) shaped (C,) (initialised by the subclass's ``reset_parameters``)."""

    def __init__(
        self, num_features: int, eps: float, stats_dtype: torch.dtype | None, backend: str | None,
        device: torch.device | str | None, dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))


@register_norm(
    "frn",
    family="norm-activation",
    paper=FRN,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="x / sqrt(mean_HW x² + ε) · γ + β, then TLU max(y, τ): per-sample, per-channel, no centering",
    aliases=("filter_response_norm", "frn_tlu"),
)
class FilterResponseNorm(_ResponseNorm):
    """Filter Response Normalization + TLU (Singh & Krishnan, 2019/CVPR 2020, arXiv:1911.09737).

    ::

        ν² = mean over the spatial dims of x²      (per sample and channel; no mean subtraction)
        y  = γ · x / sqrt(ν² + ε) + β
        z  = max(y, τ)                             Thresholded Linear Unit (apply_act=True)

    Replaces BN + ReLU. Defaults as the paper: ``eps=1e-6``, γ = 1, β = 0, τ = 0.
    ``apply_act=False`` drops the TLU (and τ) but keeps the normalization (unlike EvoNorm's
    ``apply_act=False``). ``learnable_eps=True`` adds a learned scalar ``learned_eps``
    (initialised to ``learned_eps_init=1e-4``) and uses ``ε = eps + |learned_eps|`` — the paper
    recommends a learned ε for 1×1 activation maps (e.g. after global pooling or in FC layers);
    the formulation and init follow TF-Addons' ``FilterResponseNormalization(learned_epsilon=True)``;
    ``eps=0`` gives the paper's bare ``|ε|``. Accepts (N, C, *) input; (N, C) is a 1×1 map.

    timm's ``FilterResponseNormTlu2d`` has the same keys (``weight``, ``bias``, ``tau``, all (C,))
    but defaults to ``eps=1e-5`` and has no learned ε; its ``FilterResponseNormAct2d`` applies a
    generic activation (ReLU) instead of the TLU.
    """

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        eps: float = 1e-6,
        *,
        learnable_eps: bool = False,
        learned_eps_init: float = 1e-4,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, stats_dtype, backend, device, dtype)
        kw = {"device": device, "dtype": dtype}
        self.apply_act = bool(apply_act)
        self.learned_eps_init = float(learned_eps_init)
        self.tau = nn.Parameter(torch.empty(num_features, **kw)) if apply_act else None
        self.learned_eps = nn.Parameter(torch.empty(1, **kw)) if learnable_eps else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.learned_eps is not None:
            nn.init.constant_(self.learned_eps, self.learned_eps_init)

    def forward(self, x: Tensor) -> Tensor:
        check_channels_first(x, self.num_features, type(self).__name__)
        return filter_response_norm(
            x,
            self.weight,
            self.bias,
            self.tau,
            self.eps,
            learned_eps=self.learned_eps,
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}"
        if self.learned_eps is not None:
            s += ", learnable_eps=True"
        return s + options_repr(self)


@register_norm(
    "grn",
    family="response",
    paper=CONVNEXT_V2,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="ConvNeXt-V2 Global Response Norm: x + γ·x·(‖x‖_HW / mean_C ‖x‖_HW) + β",
    aliases=("global_response_norm",),
)
class GlobalResponseNorm(_ResponseNorm):
    """Global Response Normalization (Woo et al., ConvNeXt V2, 2023, arXiv:2301.00808).

    ::

        G = ‖x‖₂ over the spatial dims             (per sample and channel)
        N = G / (mean_C G + eps)
        y = γ · (x · N) + β + x

    γ and β are zero-initialised as in the official code, so the layer starts as the identity.
    eps = 1e-6 (official, hard-coded there). The official ``GRN`` is channels-last
    ``(N, H, W, C)`` (it sits between the MLP's linear layers); normkit registers ``grn`` as
    channels-first ``(N, C, *spatial)`` like its other image norms, and ``channels_last=True``
    gives the official layout ``(N, *spatial, C)``.

    Parameters are ``weight`` (γ) and ``bias`` (β) shaped (C,). ``load_state_dict`` also accepts
    the official ``gamma``/``beta`` keys shaped (1, 1, 1, C) and timm's ``GlobalResponseNorm``
    ``weight``/``bias`` shaped (1, 1, 1, C) or (1, C, 1, 1); they are reshaped to (C,).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        *,
        channels_last: bool = False,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, stats_dtype, backend, device, dtype)
        self.channels_last = bool(channels_last)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        for old, new in (("gamma", "weight"), ("beta", "bias")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        for name in ("weight", "bias"):
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and t.dim() > 1 and t.numel() == self.num_features:
                state_dict[prefix + name] = t.reshape(self.num_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        dim = -1 if self.channels_last else 1
        if x.dim() < 3 or x.shape[dim] != self.num_features:
            layout = f"(N, *spatial, {self.num_features})" if self.channels_last else f"(N, {self.num_features}, *spatial)"
            raise ValueError(f"GlobalResponseNorm expects {layout} input with at least one spatial dim, got {tuple(x.shape)}")
        return global_response_norm(
            x,
            self.weight,
            self.bias,
            self.eps,
            channels_last=self.channels_last,
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}" + (", channels_last=True" if self.channels_last else "")
        return s + options_repr(self)
