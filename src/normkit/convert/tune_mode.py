"""Tune-mode ConvBN for fine-tuning with frozen BatchNorm statistics: :func:`tune_mode_convbn`.

You, Qin, Bao, Cao, Huang, Shan, Long, "Efficient ConvBN Blocks for Transfer Learning and Beyond",
ICLR 2024, arXiv:2305.11624 (official code ``apple/ml-tune-mode-convbn``; upstreamed as torch's
``efficient_conv_bn_eval`` inductor pass). A Conv followed by a BatchNorm in *eval* mode ("Eval mode"
of transfer learning: running statistics frozen, γ, β and the conv weights trained) is computed as
one convolution with weights re-derived on every forward, differentiably::

    k  = γ / √(running_var + eps)                  (C_out,)
    W' = W · k[:, None, ...]
    b' = β + k · (b_conv − running_mean)           (b_conv = 0 without a conv bias)
    y  = conv(x, W', b')

The output and the gradients (input, W, b_conv, γ, β) are those of conv → BN(eval) — only rounding
differs — but the conv output is no longer saved for BN's backward: one activation-sized tensor
less per block, and one pass over it less. Unlike folding ("Deploy mode", :func:`fold_norms`), the
parameters stay the original ones, so training is as stable as Eval mode (the paper's analysis).

How it is applied here: the pairs are found as :func:`~normkit.convert.fold.fold_norms` finds them
(an fx trace of the model or of its traceable submodules, else consecutive ``nn.Sequential``
children; the conv's output must feed only the BN),
and each pair is **patched per instance** (as Liger-Kernel and ``kernels`` patch norms): the conv's
``forward`` computes the fused convolution while its BN is in eval mode with running statistics,
and the BN's ``forward`` passes its input through in that state. In training mode both run as
before, so ``model.train()`` / ``model.eval()`` switch between Train and Tune mode. Parameters,
buffers and state-dict keys are unchanged; :meth:`TuneModeReport.restore` removes the patches. A
patched model compiles with ``torch.compile(model, fullgraph=True)`` (the patch is plain tensor code).

Divergence: torch's pass computes ``k``, ``W'``, ``b'`` in float32 for half-precision weights and
casts back; here they are computed in the parameters' dtype (identical for float32 models).

``python -m normkit.convert.measure`` measures saved-tensor bytes and step time on a small ResNet.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.convert.fold import _CONVS, _plain_layer, _sequential_pairs, _traced_pairs, aliased_modules

__all__ = ["TuneModeReport", "saved_tensor_bytes", "tune_mode_convbn"]

_BN_ATTR = "_normkit_tune_bn"


def _tuned(bn: _BatchNorm) -> bool:
    """Whether the pair runs fused now: BN in eval mode with running statistics."""
    return not bn.training and bn.running_var is not None and bn.running_mean is not None


def _conv_forward(self: nn.Module, x: Tensor) -> Tensor:
    bn = self.__dict__[_BN_ATTR]
    if not _tuned(bn):
        return type(self).forward(self, x)
    k = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        k = bn.weight * k
    shift = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
    bias = k * shift if bn.bias is None else bn.bias + k * shift
    weight = self.weight * k.reshape(-1, *([1] * (self.weight.dim() - 1)))
    return self._conv_forward(x, weight, bias)


def _bn_forward(self: _BatchNorm, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    if _tuned(self) and not args and not kwargs:
        return x
    return type(self).forward(self, x, *args, **kwargs)


@dataclass
class TuneModeReport:
    """The ``(conv, bn)`` name pairs patched by :func:`tune_mode_convbn`, the ``model``, the BNs left
    alone (``skipped``: name and reason) and ``adjacency`` (``"fx"`` / ``"sequential"``)."""

    model: nn.Module
    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    adjacency: str = "fx"

    def restore(self) -> None:
        """Remove the patches: the model computes conv → BN again (its parameters were never changed)."""
        modules = dict(self.model.named_modules())
        for conv_name, bn_name in self.pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            for m, attrs in ((conv, ("forward", _BN_ATTR)), (bn, ("forward",))):
                for a in attrs:
                    m.__dict__.pop(a, None)
        self.pairs = []

    def __str__(self) -> str:
        lines = [f"{len(self.pairs)} Conv→BN pairs in tune mode (adjacency: {self.adjacency})"]
        lines += [f"  {c} -> {b}" for c, b in self.pairs]
        lines += [f"  {b}: skipped: {why}" for b, why in self.skipped]
        return "\n".join(lines)


def tune_mode_convbn(model: nn.Module, *, inplace: bool = True) -> TuneModeReport:
    """Put every Conv → BatchNorm pair of ``model`` in tune mode (see the module docstring).

    Args:
        model: any ``nn.Module``; pairs are a ``nn.Conv1d/2d/3d`` (torch's forward, any subclass
            that does not override it) whose output feeds only a ``_BatchNorm`` (torch's or
            normkit's, channels first) with running statistics.
        inplace: patch ``model`` itself (default, like ``model.eval()``); ``False`` patches a deep copy.

    Returns:
        :class:`TuneModeReport` with the patched ``(conv, bn)`` names; ``report.restore()`` undoes it.
        Raises ``ValueError`` when the model has no such pair.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tune_mode_convbn expects an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    try:
        pairs, used = _traced_pairs(target, None)
    except Exception:  # noqa: BLE001  (untraceable model: the Sequential rule)
        pairs, used = _sequential_pairs(target), "sequential"
    modules = dict(target.named_modules())
    aliased = aliased_modules(target, tied=False)  # tied weights are fine: tune mode never writes them
    report = TuneModeReport(target, adjacency=used)
    seen: set[str] = set()
    for p in pairs:
        if p.side != "after" or p.norm in seen:
            continue
        bn, conv = modules.get(p.norm), modules.get(p.layer)
        if not isinstance(bn, _BatchNorm) or not isinstance(conv, _CONVS):
            continue
        why = _plain_layer(conv)
        if why is None and (id(conv) in aliased or id(bn) in aliased):
            # e.g. a conv listed twice in a Sequential: the patch would fuse the BN into its other call too
            why = aliased.get(id(conv)) or aliased[id(bn)]
        if why is None and getattr(bn, "channels_last", False):
            why = "channels_last BatchNorm after a convolution"
        if why is None and bn.running_var is None:
            why = "no running statistics (track_running_stats=False)"
        if why is None and conv.out_channels != bn.num_features:
            why = f"{conv.out_channels} conv channels, {bn.num_features} BN features"
        if why is None and (_BN_ATTR in conv.__dict__ or "forward" in bn.__dict__):
            why = "already patched"
        if why:
            report.skipped.append((p.norm, why))
            continue
        conv.__dict__[_BN_ATTR] = bn
        conv.forward = types.MethodType(_conv_forward, conv)
        bn.forward = types.MethodType(_bn_forward, bn)
        report.pairs.append((p.layer, p.norm))
        seen.add(p.norm)
    if not report.pairs:
        raise ValueError(
            f"tune_mode_convbn found no Conv → BatchNorm pair in {type(model).__name__}"
            + (f" ({'; '.join(f'{b}: {w}' for b, w in report.skipped)})" if report.skipped else "")
        )
    return report


# ---------------------------------------------------------------------------------- measurement


def saved_tensor_bytes(step: Any, params: Sequence[Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``step()`` runs its forward,
    excluding the storage of ``params`` (weights are saved by reference, not copied)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())
