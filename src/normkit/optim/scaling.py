"""AdamW learning rate and weight decay across widths: μP's rate with the √d weight-decay rule.

Fan, Liu, Zhao, Yuan, Gu, "Robust Layerwise Scaling Rules by Proper Weight Decay Tuning", 2025,
arXiv:2510.15262.

Why: with normalization layers, training soon reaches an optimizer-governed steady state in which
a matrix parameter's scale is set by AdamW's balance of update and decay, not by its
initialization: its singular values scale as ``√(η/λ)`` with a width-invariant shape, and the top
singular value as ``√(η/λ) · d^0.75`` (paper, abstract). μP's learning-rate rule alone
(``η₂ ∝ 1/d``) then no longer keeps each sublayer's gain width-invariant. Holding
``√(η₂/λ₂) · d^0.75`` constant with ``η₂ ∝ d⁻¹`` gives the paper's rule::

    matrix-like parameters (hidden and output weight matrices, conv kernels):
        η₂(d) = η₂(d₀) · d₀ / d          (μP)
        λ₂(d) = λ₂(d₀) · √(d / d₀)       (the weight-decay scaling rule, λ₂ ∝ √d)
    vector-like parameters (gains, biases, embeddings):
        η₁(d) = η₁(d₀)                   (Θ(1))
        λ₁ = 0

``λ`` is AdamW's decoupled coefficient as in :class:`torch.optim.AdamW` (``θ ← θ − η λ θ`` per
step), so the per-step decay ``η₂ λ₂`` scales as ``d^(−1/2)``. Tune ``(η, λ)`` once at the proxy
width ``d₀`` and transfer them zero-shot. The paper's own check is that top singular values of
corresponding matrices match across widths (:func:`top_singular_values`).

Divergence, with a switch: the paper classifies parameters as in μP; here a parameter with two or
more dimensions outside an ``nn.Embedding`` is matrix-like and everything else vector-like
(``is_matrix=`` overrides it per parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["top_singular_values", "width_scaled_param_groups", "width_scaling"]

IsMatrix = Callable[[str, nn.Parameter, nn.Module], bool]


def _check_width(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def width_scaling(base_width: float, width: float) -> dict[str, tuple[float, float]]:
    """Multipliers ``(lr factor, weight-decay factor)`` from ``base_width`` to ``width``.

    ``{"matrix": (d₀/d, √(d/d₀)), "vector": (1, 0)}``: multiply the proxy's learning rate and
    weight decay of each kind by them (the vector kind's decay factor 0 is the rule's ``λ₁ = 0``).
    """
    d0, d = _check_width("base_width", base_width), _check_width("width", width)
    return {"matrix": (d0 / d, math.sqrt(d / d0)), "vector": (1.0, 0.0)}


def _default_is_matrix(_: str, p: nn.Parameter, owner: nn.Module) -> bool:
    return p.dim() >= 2 and not isinstance(owner, nn.Embedding)


def width_scaled_param_groups(
    model: nn.Module,
    *,
    base_width: float,
    width: float,
    lr: float,
    weight_decay: float,
    vector_lr: float | None = None,
    is_matrix: IsMatrix | None = None,
) -> list[dict[str, Any]]:
    """Two AdamW parameter groups for ``model`` at ``width`` from hyperparameters tuned at ``base_width``.

    Args:
        model: the model at the target width.
        base_width, width: the proxy's width ``d₀`` and the target's ``d`` (e.g. hidden size).
        lr, weight_decay: ``η₂``, ``λ₂`` tuned for the matrix-like parameters at ``base_width``.
        vector_lr: ``η₁`` of the vector-like parameters (default ``lr``); kept at every width,
            with no weight decay.
        is_matrix: ``(name, parameter, owning module) -> bool``; default: ≥ 2 dims, not an embedding.

    Returns:
        ``[{"params", "lr", "weight_decay", "name": "matrix"}, {... "name": "vector"}]`` (an empty
        group is left out), ready for ``torch.optim.AdamW(groups)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"width_scaled_param_groups expects an nn.Module, got {type(model).__name__}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)) + ((("vector_lr", vector_lr),) if vector_lr is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    factors = width_scaling(base_width, width)
    classify = is_matrix or _default_is_matrix
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    matrix: list[nn.Parameter] = []
    vector: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (matrix if classify(name, p, owners[id(p)]) else vector).append(p)
    (lr_m, wd_m), (lr_v, wd_v) = factors["matrix"], factors["vector"]
    groups = [
        {"params": matrix, "lr": lr * lr_m, "weight_decay": weight_decay * wd_m, "name": "matrix"},
        {"params": vector, "lr": (lr if vector_lr is None else vector_lr) * lr_v, "weight_decay": wd_v, "name": "vector"},
    ]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def top_singular_values(params: Iterable[tuple[str, Tensor]] | nn.Module) -> dict[str, float]:
    """Largest singular value of every matrix-like parameter (kernels flattened to ``(out, in·k…)``).

    The paper's diagnostic: with the rule applied, corresponding matrices of the proxy and the
    target model have matching top singular values in the steady state.
    """
    named = params.named_parameters() if isinstance(params, nn.Module) else params
    out = {}
    for name, p in named:
        if p.dim() >= 2:
            out[name] = float(torch.linalg.matrix_norm(p.detach().float().flatten(1), ord=2))
    return out
