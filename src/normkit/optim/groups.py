"""Parameter-group helpers shared by the layer-wise optimizers.

LAMB, LARS and most recipes around them (BERT's LAMB, SimCLR/BYOL's LARS) leave biases and the
gains/offsets of normalization layers out of both weight decay and the layer-wise trust ratio: a
bias or a norm gain has no "layer scale" to compare its update with, and decaying a norm's gain
fights the normalization. :func:`bias_and_norm_groups` builds that split once for every optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from normkit.optim.scale_invariant import _norm_view

Rule = Callable[[str, nn.Parameter, nn.Module], bool]


def is_bias_or_norm(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """The default exclusion rule: any parameter with at most one dimension (biases, gains, scalars)
    or owned by a normalization module (recognised as in :func:`normkit.optim.find_scale_invariant`)."""
    return param.dim() <= 1 or _norm_view(module, {}) is not None


def bias_and_norm_groups(
    model: nn.Module,
    *,
    rule: Rule = is_bias_or_norm,
    excluded: dict[str, Any] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Two parameter groups: the weights, and the parameters ``rule`` excludes.

    The excluded group gets ``weight_decay=0`` and ``trust_ratio=False`` (the LAMB/LARS switch for
    the layer-wise scaling), updated by ``excluded``; ``options`` go into both groups. Parameters
    that do not require grad are left out; a parameter shared between modules is listed once.

    >>> opt = LAMB(bias_and_norm_groups(model, weight_decay=0.01), lr=1e-3)   # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    kept: list[nn.Parameter] = []
    dropped: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (dropped if rule(name, p, module) else kept).append(p)
    extra = {"weight_decay": 0.0, "trust_ratio": False, **(excluded or {})}
    groups = [{"params": kept, **options}, {"params": dropped, **options, **extra}]
    return [g for g in groups if g["params"]]
