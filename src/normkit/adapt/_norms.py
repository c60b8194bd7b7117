"""Finding normalization layers in a model: torch's norm classes, every class in normkit's registry, and
third-party norms recognised by behaviour (transformers' ``LlamaRMSNorm``, ``GemmaRMSNorm``, ...; see
:func:`normkit.nn.recognize.recognise_norm`, the recognition ``replace_norms`` uses too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normkit.nn.recognize import is_third_party_norm
from normkit.registry import norm_info_of

#: torch's own normalization classes (normkit's subclass them where they share math)
TORCH_NORMS: tuple[type[nn.Module], ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
#: torch classes counted as the "layer" family (LN-tuning)
TORCH_LAYER_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)

NormKind = Literal["all", "batch", "layer"]
NORM_KINDS = ("all", "batch", "layer")


def is_norm(module: nn.Module, kind: NormKind = "all") -> bool:
    """Whether ``module`` is a normalization layer of ``kind``.

    ``"batch"``: batch-dependent norms (torch ``_BatchNorm`` or a registered norm with
    ``batch_dependent=True``); ``"layer"``: LayerNorm/RMSNorm-type norms (torch's, registered in the
    ``"layer"`` family, or third-party ones such as transformers' RMSNorms); ``"all"``: any of these.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
    info = norm_info_of(module)
    if kind == "batch":
        return isinstance(module, _BatchNorm) or (info is not None and info.batch_dependent)
    if kind == "layer":
        return (isinstance(module, TORCH_LAYER_NORMS) or (info is not None and info.family == "layer")
                or is_third_party_norm(module))
    return isinstance(module, TORCH_NORMS) or info is not None or is_third_party_norm(module)


def named_norms(model: nn.Module, kind: NormKind = "all") -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every normalization layer of ``kind`` in ``model``, nested ones included.

    A composite norm (e.g. IBN's InstanceNorm + BatchNorm halves) is listed together with the norms
    inside it; callers that take a layer's *own* parameters (``recurse=False``) count each once.
    """
    for name, m in model.named_modules():
        if is_norm(m, kind):
            yield name, m
