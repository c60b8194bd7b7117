"""LayerNorm Scaling (LNS): a pre-norm's output scaled by 1/√ℓ for the block at depth ℓ.

Sun, Song, Li, Yin, Zheng, Liu, "The Curse of Depth in Large Language Models", NeurIPS 2025,
arXiv:2502.05795. Official code: ``lmsdss/LayerNorm-Scaling`` (``peft_pretraining/modeling_llama.py``,
``NORM_TYPE=LNS``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from normkit.nn.layer_norm import LayerNorm, RMSNorm
from normkit.nn.recognize import exact_equivalent, is_third_party_norm
from normkit.registry import Paper, register_norm

CURSE_OF_DEPTH = Paper("The Curse of Depth in Large Language Models", 2025, "2502.05795", "Sun, Song, Li, Yin, Zheng, Liu")


def _check_index(layer_index: int) -> int:
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 1:
        raise ValueError(f"layer_index must be the 1-based depth ℓ >= 1 of the block (first block: 1), got {layer_index!r}")
    return layer_index


class _Scaled:
    """Mixin: multiply the norm's output by ``1/√layer_index`` (a Python float: no state-dict entry)."""

    layer_index: int

    def _set_index(self, layer_index: int) -> None:
        self.layer_index = _check_index(layer_index)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.layer_index)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        y = super().forward(x, mask)  # type: ignore[misc]
        return y if self.layer_index == 1 else y * self.scale

    def forward_add(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Fused pre-norm step: ``(norm(x + residual) / √ℓ, x + residual)``."""
        y, s = super().forward_add(x, residual)  # type: ignore[misc]
        return (y if self.layer_index == 1 else y * self.scale), s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layer_index={self.layer_index}"  # type: ignore[misc]


@register_norm(
    "layernorm_scaling",
    family="layer",
    paper=CURSE_OF_DEPTH,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="LayerNorm whose output is scaled by 1/√ℓ at block depth ℓ (Curse of Depth)",
    aliases=("lns", "layer_norm_scaling"),
)
class LayerNormScaling(_Scaled, LayerNorm):
    """LayerNorm Scaling: ``y = LayerNorm(x) / √ℓ`` (Sun et al., NeurIPS 2025, arXiv:2502.05795).

    ``ℓ = layer_index`` is the **1-based** depth of the transformer block the norm belongs to
    (the official code uses ``1/sqrt(layer_index + 1)`` with a 0-based block index, so the
    first block is unscaled). Both pre-norms of a block (attention and MLP) share its ℓ; the
    final norm before the head is not scaled. The scale applies after the affine:
    ``y = (LN(x)·γ + β)/√ℓ``. No new parameters or buffers: the state dict is
    ``nn.LayerNorm``'s, so LN checkpoints load unchanged. :func:`apply_layernorm_scaling`
    converts and indexes the norms of a stack of blocks.

    The official experiments use RMSNorm (LLaMA); :class:`RMSNormScaling` is that variant.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        layer_index: int = 1,
        eps: float = 1e-5,
        *args,
        **kwargs,  # noqa: ANN002, ANN003
    ) -> None:
        self._set_index(layer_index)
        super().__init__(normalized_shape, eps, *args, **kwargs)


@register_norm(
    "rmsnorm_scaling",
    family="layer",
    paper=CURSE_OF_DEPTH,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="RMSNorm whose output is scaled by 1/√ℓ at block depth ℓ (Curse of Depth, as in its LLaMA code)",
    aliases=("rms_scaling",),
)
class RMSNormScaling(_Scaled, RMSNorm):
    """RMSNorm with LayerNorm Scaling: ``y = RMSNorm(x) / √ℓ`` — the official code's setting (LLaMA, eps 1e-6).

    Same conventions as :class:`LayerNormScaling` (1-based ``layer_index``; state dict is
    ``nn.RMSNorm``'s). ``eps=None`` follows torch (``finfo(dtype).eps``); LLaMA configs use 1e-6.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        layer_index: int = 1,
        eps: float | None = None,
        *args,
        **kwargs,  # noqa: ANN002, ANN003
    ) -> None:
        self._set_index(layer_index)
        super().__init__(normalized_shape, eps, *args, **kwargs)


def _scaled_copy(m: nn.Module, layer_index: int) -> nn.Module | None:
    """A LayerNormScaling/RMSNormScaling equal to the plain norm ``m`` (same parameters), or None if ``m`` is not one.

    A third-party norm (e.g. transformers' ``LlamaRMSNorm``, ``GemmaRMSNorm``) is first mapped to its
    exact normkit equivalent by the shared recognition (:func:`normkit.nn.recognize.exact_equivalent`:
    checked numerically, Gemma's ``1 + w`` as ``weight_offset=1``, the bf16 rounding order as ``casting``).
    """
    if is_third_party_norm(m):
        m, _ = exact_equivalent(m)
        if m is None:
            return None
    p = next(iter(m.parameters()), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    opts = {k: getattr(m, k) for k in ("weight_offset", "casting", "stats_dtype", "backend") if hasattr(m, k)}
    if type(m) in (nn.LayerNorm, LayerNorm):
        new: nn.Module = LayerNormScaling(
            m.normalized_shape, layer_index, m.eps, m.elementwise_affine, m.bias is not None, **opts, **kw
        )
    elif type(m) in (nn.RMSNorm, RMSNorm):
        has_bias = getattr(m, "bias", None) is not None
        new = RMSNormScaling(m.normalized_shape, layer_index, m.eps, m.elementwise_affine, bias=has_bias, **opts, **kw)
    else:
        return None
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def _width(m: nn.Module) -> int | None:
    """The normalized width of a norm this function would touch (None for other modules)."""
    if not isinstance(m, (_Scaled, nn.LayerNorm, nn.RMSNorm)) and not is_third_party_norm(m):
        return None
    shape = getattr(m, "normalized_shape", None)
    if shape:
        return int(shape[-1]) if isinstance(shape, (tuple, list)) else int(shape)
    w = getattr(m, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() else None


def apply_layernorm_scaling(
    blocks: Iterable[nn.Module], *, start: int = 1, qk_norms: bool = False
) -> list[tuple[str, int]]:
    """Apply LayerNorm Scaling to a sequence of transformer blocks, in place.

    Block ``i`` (counting from ``start``, default 1) gets ``ℓ = i``: every ``LayerNormScaling`` /
    ``RMSNormScaling`` inside it is re-indexed, and every plain ``torch.nn.LayerNorm`` /
    ``torch.nn.RMSNorm`` (or normkit's ``LayerNorm``/``RMSNorm``, exact types only) is replaced
    by its scaled counterpart with the same parameters. Third-party norms recognised by
    :func:`normkit.nn.recognize.recognise_norm` (e.g. transformers' ``LlamaRMSNorm`` in
    ``llama.model.layers``) are replaced by the scaled version of their exact normkit equivalent.
    Other modules — including subclasses such as ``LayerNorm2d`` — are left alone. Pass only the
    blocks (e.g. ``model.layers``), not the final norm, which the paper
    leaves unscaled. Returns ``[(qualified name inside its block, ℓ), …]`` of the norms scaled.

    Per-head QK-norms (Qwen3's ``q_norm``/``k_norm``, OLMo-2's …) are left alone unless
    ``qk_norms=True``: the paper scales the pre-norms that feed attention and the MLP, and
    scaling both the query and the key norm by 1/√ℓ would divide the attention logits by ℓ. A norm
    narrower than the widest norm of its block is taken to be such a per-head norm.
    """
    done: list[tuple[str, int]] = []
    for ell, block in enumerate(blocks, start=_check_index(start)):
        widths = {name: _width(m) for name, m in block.named_modules()}
        widest = max((w for w in widths.values() if w is not None), default=None)
        for name, m in list(block.named_modules()):
            if not qk_norms and widest is not None and widths[name] is not None and widths[name] < widest:
                continue  # a per-head norm inside attention (see above)
            if isinstance(m, _Scaled):
                m._set_index(ell)
                done.append((f"{ell - start}.{name}", ell))
                continue
            new = _scaled_copy(m, ell)
            if new is None:
                continue
            if not name:
                raise TypeError("apply_layernorm_scaling expects transformer blocks containing norms, got a bare norm")
            parent_name, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, new)
            done.append((f"{ell - start}.{name}", ell))
    return done


__all__ = ["CURSE_OF_DEPTH", "LayerNormScaling", "RMSNormScaling", "apply_layernorm_scaling"]
