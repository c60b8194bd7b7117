"""ScaleNorm and DyT modules."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit.backend import native_below, thread_state
from normkit.nn import papers
from normkit.nn._base import FastPath, options_repr, set_options
from normkit.registry import register_norm

#: input dtypes of the plain-expression fast paths (half inputs take the full path's casting rules)
_FLOATS = (torch.float32, torch.float64)


@register_norm(
    "scalenorm",
    family="scale",
    paper=papers.SCALE_NORM,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="g · x / ‖x‖ per token with one learned scalar g",
)
class ScaleNorm(FastPath, nn.Module):
    """ScaleNorm: ``y = g · x / max(‖x‖₂, eps)`` over the last dim (Nguyen & Salazar 2019, arXiv:1910.05895).

    One learned scalar ``scale`` initialised to ``sqrt(num_features)`` (the paper's choice),
    so at init ``y`` has unit RMS like LayerNorm's output. eps (1e-5) clamps the norm as in the
    official code rather than being added.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        scale_init: float | None = None,
        channels_last: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, backend=backend)
        self.channels_last = bool(channels_last)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.scale_init = math.sqrt(num_features) if scale_init is None else float(scale_init)
        self.scale = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.reset_parameters()
        self._plan_ready()

    _PLAN_ATTRS = frozenset({"backend", "channels_last"})
    _nk_below = 0  # (class default: no fast path until planned)

    def _replan(self) -> None:
        """``_nk_below``: below it (elements; CPU, default backend, float32/float64) ``forward`` runs the plain
        expression itself, as :func:`normkit.functional.scale_norm` does there (``"auto"``'s ``native``)."""
        self._plan_set(_nk_below=native_below("scale_norm", self.backend) if self.channels_last else 0)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.scale_init)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() < self._nk_below and x.is_cpu and thread_state.plain and x.dtype in _FLOATS:
            if x.dim() and x.shape[-1] == self.num_features:
                # the hot path: the plain expression (functional.scale_norm's native path, whose overflow
                # check of ‖x‖ runs when a backward follows, as there)
                scale = self._parameters.get("scale")  # (not self.scale: see DyT.forward)
                if scale is None:
                    scale = self.scale  # moved out of _parameters (a parametrization): the attribute
                norm = torch.linalg.vector_norm(x, 2, -1, True)
                if (not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad)
                        or (not torch.compiler.is_compiling() and math.isfinite(norm.sum().item()))):
                    y = x * (scale / norm.clamp_min(self.eps))
                    return y if y.dtype == x.dtype else y.to(x.dtype)
        dim = -1 if self.channels_last else 1
        if x.dim() < (1 if self.channels_last else 2) or x.shape[dim] != self.num_features:
            layout = f"(*, {self.num_features})" if self.channels_last else f"(N, {self.num_features}, *)"
            raise ValueError(f"{type(self).__name__} expects input of shape {layout}, got {tuple(x.shape)}")
        return F.scale_norm(x, self.scale, self.eps, dim=dim, backend=self.backend)

    def extra_repr(self) -> str:
        cf = "" if self.channels_last else ", channels_last=False"
        return f"{self.num_features}, eps={self.eps}{cf}" + options_repr(self)


@register_norm(
    "scalenorm2d",
    family="scale",
    paper=papers.SCALE_NORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="ScaleNorm over the channel dim of (N, C, *) input: g · x / ‖x‖ at every position",
)
class ScaleNorm2d(ScaleNorm):
    """ScaleNorm over the channels of a channels-first ``(N, C, *)`` tensor: ``ScaleNorm(C, channels_last=False)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, **kwargs) -> None:  # noqa: ANN003
        super().__init__(num_features, eps, channels_last=False, **kwargs)


@register_norm(
    "dyt",
    family="norm-free",
    paper=papers.DYT,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="Dynamic Tanh w · tanh(αx) + b, a statistics-free LayerNorm replacement",
    aliases=("dynamic_tanh",),
)
class DyT(FastPath, nn.Module):
    """Dynamic Tanh: ``y = w · tanh(α·x) + b`` (Zhu et al. 2025, arXiv:2503.10622).

    Parameters as the official code: scalar ``alpha`` (init ``alpha_init``, 0.5 in the paper
    for ViTs; LLMs use smaller values), per-channel ``weight`` (ones) and ``bias`` (zeros).
    ``channels_last=False`` applies the affine along dim 1 of ``(N, C, *)`` input.
    """

    def __init__(
        self,
        num_features: int,
        alpha_init: float = 0.5,
        *,
        channels_last: bool = True,
        elementwise_affine: bool = True,
        bias: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, backend=backend)
        self.num_features = int(num_features)
        self.alpha_init = float(alpha_init)
        self.channels_last = channels_last
        kw = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(1, **kw))
        self.weight = nn.Parameter(torch.empty(num_features, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **kw)) if elementwise_affine and bias else None
        self.reset_parameters()
        self._plan_ready()

    _PLAN_ATTRS = frozenset({"backend", "channels_last", "weight", "bias"})
    _nk_below = 0  # (class default: no fast path until planned)

    def _replan(self) -> None:
        """``_nk_below``: below it (elements; CPU, default backend) ``forward`` runs ``w · tanh(αx) + b`` itself,
        as :func:`normkit.functional.dyt` does there (``"auto"``'s ``native``); channels-last layers with
        both affine parameters (the others take the full path)."""
        p = self._parameters  # (a parametrization deletes the attribute before its property exists)
        ok = self.channels_last and p.get("weight") is not None and p.get("bias") is not None
        self._plan_set(_nk_below=native_below("dyt", self.backend) if ok else 0)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() < self._nk_below and x.is_cpu and thread_state.plain and x.dtype in _FLOATS:
            # the hot path: the plain expression, parameters read from ``_parameters`` (``self.alpha`` is a
            # failed attribute lookup, then ``Module.__getattr__``: ~0.8 µs each, a tenth of a 2×16×64 call).
            # ``x.size(-1)`` raises IndexError for a 0-dim input; a parameter missing from ``_parameters``
            # (``weight_norm``, a parametrization) raises KeyError: both go on to the full path.
            p = self._parameters
            try:
                if x.size(-1) == self.num_features:
                    y = torch.tanh(p["alpha"] * x) * p["weight"] + p["bias"]
                    return y if y.dtype is x.dtype else y.to(x.dtype)
            except (IndexError, KeyError):
                pass
        dim = -1 if self.channels_last else 1
        if x.dim() < (1 if self.channels_last else 2) or x.shape[dim] != self.num_features:
            layout = "(*, C)" if self.channels_last else "(N, C, *)"
            raise ValueError(f"DyT expects {layout} input with C={self.num_features}, got shape {tuple(x.shape)}")
        return F.dyt(x, self.alpha, self.weight, self.bias, channels_last=self.channels_last, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, alpha_init={self.alpha_init}, channels_last={self.channels_last}"
            + options_repr(self)
        )
