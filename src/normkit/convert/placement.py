"""Where the norms sit in a transformer block: :func:`to_peri_ln`, :func:`to_mix_ln`, :func:`to_layernorm_scaling`.

These are **architecture changes, not exact conversions**: the converted model computes a
different function from the Pre-LN original and is meant to be trained (from scratch or
fine-tuned). Each verb says how its new or moved parameters start.

* **Peri-LN** — Kim et al., "Peri-LN: Revisiting Normalization Layer in the Transformer
  Architecture", ICML 2025, arXiv:2502.02732 (no official code; the paper trained with Megatron-LM).
  A norm on the input *and* the output of every sublayer, before the residual add::

      h ← h + Norm_out(Attn(Norm_in(h)));   h ← h + Norm_out'(MLP(Norm_in'(h)))

  plus the model's final norm (the Gemma-2 / OLMo-2 layout). The paper's optional norm on the
  embedding output is not added.
* **Mix-LN** — Li, Yin, Liu, "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN
  and Post-LN", ICLR 2025, arXiv:2412.13795 (official code ``pixeli99/MixLN``,
  ``NORM_TYPE=post_pre``, ``POST_NUM=k``). The first ``k = ⌊αL⌋`` blocks are Post-LN::

      h ← Norm1(h + Attn(h));   h ← Norm2(h + MLP(h))

  and the rest stay Pre-LN; α = 0.25 as in the paper; the final norm is kept.
* **LayerNorm-Scaling** — Sun, Song, Li, Yin, Zheng, Liu, "The Curse of Depth in Large Language
  Models", NeurIPS 2025, arXiv:2502.05795: each pre-norm of block ℓ (1-based) is scaled by 1/√ℓ
  (:mod:`normkit.nn.layer_norm_scaling`).

Supported blocks (found as the first ``ModuleList``/``Sequential`` whose children all match): HF
Llama-style decoder layers (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``,
``mlp``: Llama, Mistral, Qwen2/3, ...), HF GPT-2 blocks (``ln_1``, ``attn``, ``ln_2``, ``mlp``;
no cross-attention) and timm-style / normkit bench blocks (``norm1``, ``attn``, ``norm2``,
``mlp``, called as ``attn(x)``). A converted block is given a subclass of its own class (same
parameters and names, so ``isinstance`` and the original keys still hold) whose forward places
the norms; Peri-LN adds the children ``attn_out_norm`` and ``mlp_out_norm``. Save and load with
``state_dict`` into a model converted the same way; Mix-LN adds no parameter, so its checkpoints
also load into the original class (with the Pre-LN meaning). The dynamic subclasses are not
importable by name, so ``torch.save(model)`` pickling of a converted model is not supported.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from normkit.convert.replace_norms import recognise_norm, replace_norms
from normkit.nn.layer_norm_scaling import apply_layernorm_scaling

__all__ = ["PlacementReport", "PlacementStep", "to_layernorm_scaling", "to_mix_ln", "to_peri_ln"]


class PlacementStep(NamedTuple):
    """One change: the qualified ``name`` of a block or module and what was done to it."""

    name: str
    action: str


class PlacementReport(list):
    """The :class:`PlacementStep` list of a placement change, with the converted ``model`` and its ``blocks`` path."""

    def __init__(self, model: nn.Module, placement: str, blocks: str) -> None:
        super().__init__()
        self.model = model
        self.placement = placement
        self.blocks = blocks

    def __str__(self) -> str:
        return "\n".join([f"{self.placement} on {self.blocks}: {len(self)} changes (architecture change, not exact)"]
                         + [f"  {s.name}: {s.action}" for s in self])


# ------------------------------------------------------------------------------------------ block kinds


class _Kind(NamedTuple):
    """Names of a block's two pre-norms and sublayers, and how its forward calls the attention."""

    name: str
    norm1: str
    attn: str
    norm2: str
    mlp: str
    call_attn: Callable[[nn.Module, Tensor, dict[str, Any]], Tensor]


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _llama_attn(block: nn.Module, x: Tensor, kw: dict[str, Any]) -> Tensor:
    return _first(block.self_attn(hidden_states=x, **kw))


def _gpt2_attn(block: nn.Module, x: Tensor, kw: dict[str, Any]) -> Tensor:
    if kw.pop("encoder_hidden_states", None) is not None:
        raise ValueError("a Peri-LN/Mix-LN GPT-2 block has no cross-attention; got encoder_hidden_states")
    kw.pop("encoder_attention_mask", None)
    return _first(block.attn(x, **kw))


def _plain_attn(block: nn.Module, x: Tensor, kw: dict[str, Any]) -> Tensor:
    return _first(block.attn(x, **kw))


_KINDS = (
    _Kind("Llama-style decoder layer", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp", _llama_attn),
    _Kind("GPT-2 block", "ln_1", "attn", "ln_2", "mlp", _gpt2_attn),
    _Kind("pre-norm block (norm1/attn/norm2/mlp)", "norm1", "attn", "norm2", "mlp", _plain_attn),
)
#: children that would mean a block has more than the two pre-norm sublayers (Gemma-2's sandwich
#: norms, GPT-2 cross-attention, ...): such blocks are refused rather than silently mis-placed
_FOREIGN = ("crossattention", "pre_feedforward_layernorm", "post_feedforward_layernorm", "ln_cross_attn")


def _kind_of(block: nn.Module) -> _Kind | None:
    for kind in _KINDS:
        if all(isinstance(getattr(block, n, None), nn.Module) for n in (kind.norm1, kind.attn, kind.norm2, kind.mlp)):
            return kind
    return None


def _check_returns_tensor(block: nn.Module, where: str, kind: _Kind, verb: str) -> None:
    """The placed forward returns the hidden states as one tensor, as transformers 5's decoder layers do.
    transformers 4.x's GPT-2 blocks and (before 4.54) Llama-style layers return a tuple that the model
    indexes with ``[0]``: a tensor there would be read as its first batch element, so such blocks are refused."""
    if kind.call_attn is _plain_attn or isinstance(block, _Placed):
        return
    returns = inspect.signature(type(block).forward).return_annotation
    if returns is not Tensor and returns not in ("Tensor", "torch.Tensor", "torch.FloatTensor"):
        raise TypeError(
            f"{verb}: block {where} ({type(block).__name__}) declares it returns {returns}, not a torch.Tensor "
            "(transformers 4.x blocks return tuples); the placed forward supports blocks that return the hidden "
            "states as one tensor (transformers >= 5)"
        )


def _find_blocks(model: nn.Module, verb: str) -> tuple[str, nn.Module, _Kind]:
    """``(path, container, kind)`` of the first ModuleList/Sequential whose children are all supported blocks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} expects an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            kinds = {_kind_of(b) for b in m}
            if len(kinds) == 1 and None not in kinds:
                kind = kinds.pop()
                for i, b in enumerate(m):
                    bad = [c for c in _FOREIGN if hasattr(b, c)]
                    if bad:
                        raise TypeError(f"{verb}: block {name}.{i} has {bad[0]}; only two-sublayer pre-norm blocks are supported")
                    _check_returns_tensor(b, f"{name}.{i}", kind, verb)
                return name, m, kind
    raise TypeError(
        f"{verb}: no stack of supported blocks in {type(model).__name__}; expected a ModuleList/Sequential of HF "
        "Llama-style decoder layers (input_layernorm, self_attn, post_attention_layernorm, mlp), GPT-2 blocks "
        "(ln_1, attn, ln_2, mlp) or pre-norm blocks (norm1, attn, norm2, mlp)"
    )


# ------------------------------------------------------------------------------------------ the placed forward


class _Placed:
    """Mixin of the converted block classes: ``placement`` is ``"peri"`` or ``"post"``; the rest is the original class."""

    _nk_kind: _Kind
    _nk_signature: inspect.Signature
    placement: str

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        kind = self._nk_kind
        bound = self._nk_signature.bind(self, *args, **kwargs)
        params = list(bound.arguments.items())[1:]  # drop self
        h = params[0][1]
        kw: dict[str, Any] = {}
        for pname, value in params[1:]:
            if self._nk_signature.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            elif self._nk_signature.parameters[pname].kind is not inspect.Parameter.VAR_POSITIONAL:
                kw[pname] = value
        norm1, norm2, mlp = getattr(self, kind.norm1), getattr(self, kind.norm2), getattr(self, kind.mlp)
        if self.placement == "post":
            h = norm1(h + kind.call_attn(self, h, kw))
            return norm2(h + mlp(h))
        h = h + self.attn_out_norm(kind.call_attn(self, norm1(h), kw))
        return h + self.mlp_out_norm(mlp(norm2(h)))

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"placement={self.placement}" + (f", {base}" if base else "")


_CLASSES: dict[type, type] = {}


def _placed_class(cls: type, kind: _Kind) -> type:
    """``Placed<cls>``: the mixin over the block's own class (one per class, reused)."""
    if issubclass(cls, _Placed):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Placed{cls.__name__}", (_Placed, cls),
                             {"_nk_kind": kind, "_nk_signature": inspect.signature(cls.forward), "__module__": cls.__module__})
    return _CLASSES[cls]


def _place(block: nn.Module, kind: _Kind, placement: str, where: str) -> None:
    if isinstance(block, _Placed):
        raise ValueError(f"block {where} already has placement={block.placement!r}; convert the Pre-LN original")
    block.__class__ = _placed_class(type(block), kind)
    block.placement = placement


# ------------------------------------------------------------------------------------------ Peri-LN


def _fresh_norm(template: nn.Module) -> nn.Module:
    """A norm of the same class, size, eps, device and dtype as ``template``, at identity affine (γ = 1, β = 0)."""
    new = copy.deepcopy(template)
    with torch.no_grad():
        if hasattr(new, "reset_parameters"):
            new.reset_parameters()
        else:
            if isinstance(getattr(new, "weight", None), Tensor):
                new.weight.fill_(1.0)
            if isinstance(getattr(new, "bias", None), Tensor):
                new.bias.zero_()
    return new


def _fit_affine(norm: nn.Module, outputs: list[Tensor]) -> None:
    """Per-feature least squares of the sublayer output ``y`` on ``n = norm(y)`` (norm at γ = 1, β = 0):
    ``γ_j = cov(y_j, n_j) / var(n_j)``, ``β_j = mean y_j − γ_j mean n_j`` (a norm without bias:
    ``γ_j = Σ y n / Σ n²``), so ``Norm_out(y) ≈ y`` on the calibration data."""
    y = torch.cat([o.detach().reshape(-1, o.shape[-1]) for o in outputs]).double()
    with torch.no_grad():
        n = norm(y.to(norm.weight.dtype)).double()
        has_bias = isinstance(getattr(norm, "bias", None), Tensor)
        if has_bias:
            yc, nc = y - y.mean(0), n - n.mean(0)
            g = (yc * nc).sum(0) / nc.square().sum(0).clamp_min(1e-30)
            norm.bias.copy_(y.mean(0) - g * n.mean(0))
        else:
            g = (y * n).sum(0) / n.square().sum(0).clamp_min(1e-30)
        norm.weight.copy_(g)


def _sublayer_outputs(model: nn.Module, subs: list[nn.Module], calibration: Any) -> list[list[Tensor]]:
    """The outputs of each module in ``subs`` when ``model`` (the Pre-LN original) runs on ``calibration``
    (in eval mode, so dropout does not enter the fit; the mode is restored)."""
    seen: list[list[Tensor]] = [[] for _ in subs]
    hooks = [s.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(_first(out))) for i, s in enumerate(subs)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(**calibration) if isinstance(calibration, dict) else model(calibration)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def to_peri_ln(model: nn.Module, *, calibration: Any = None, inplace: bool = True) -> PlacementReport:
    """Give every block of a Pre-LN model an output norm on each sublayer (Peri-LN, arXiv:2502.02732).

    Block forward becomes ``h ← h + Norm_out(F(Norm_in(h)))`` for F ∈ {attention, MLP}; the existing
    pre-norms are the input norms and keep their weights; the final norm is kept. The output norms
    are new children ``attn_out_norm`` / ``mlp_out_norm`` of the block's own norm class (same size,
    eps, dtype, device: ``LayerNorm`` for GPT-2, ``LlamaRMSNorm`` for Llama, ...).

    Their initialisation:

    * default: γ = 1, β = 0 — the paper's and Gemma-2/OLMo-2's init for training from scratch. A
      pretrained model's function changes (each sublayer output is rescaled to unit RMS).
    * ``calibration=`` a batch (tensor, or a dict of keyword arguments) for the original model:
      each output norm's affine is fitted, per feature, to reproduce its sublayer's output on that
      batch (:func:`_fit_affine`: least squares of ``y`` on ``Norm(y)``). The model then starts close
      to the original (not equal: the norm divides each token by its own RMS), which is what a
      fine-tuning start needs.

    Architecture change, not exact. ``inplace=False`` converts a deep copy. Returns a
    :class:`PlacementReport`.
    """
    path, blocks, kind = _find_blocks(model, "to_peri_ln")
    for i, b in enumerate(blocks):
        if isinstance(b, _Placed):
            raise ValueError(f"block {path}.{i} already has placement={b.placement!r}; convert the Pre-LN original")
    outputs = None
    if calibration is not None:
        subs = [m for b in blocks for m in (getattr(b, kind.attn), getattr(b, kind.mlp))]
        outputs = _sublayer_outputs(model, subs, calibration)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = model.get_submodule(path)
    report = PlacementReport(model, "Peri-LN", path)
    init = "γ fitted to the calibration batch" if outputs is not None else "γ = 1, β = 0"
    for i, b in enumerate(blocks):
        b.attn_out_norm = _fresh_norm(getattr(b, kind.norm1))
        b.mlp_out_norm = _fresh_norm(getattr(b, kind.norm2))
        if outputs is not None:
            _fit_affine(b.attn_out_norm, outputs[2 * i])
            _fit_affine(b.mlp_out_norm, outputs[2 * i + 1])
        _place(b, kind, "peri", f"{path}.{i}")
        report.append(PlacementStep(f"{path}.{i}", f"Peri-LN: + attn_out_norm, mlp_out_norm "
                                                   f"({type(b.attn_out_norm).__name__}, {init})"))
    return report


# ------------------------------------------------------------------------------------------ Mix-LN


def to_mix_ln(model: nn.Module, alpha: float = 0.25, *, inplace: bool = True) -> PlacementReport:
    """Make the first ``k = ⌊α·L⌋`` blocks Post-LN and keep the rest Pre-LN (Mix-LN, arXiv:2412.13795).

    A Post-LN block computes ``h ← Norm1(h + Attn(h)); h ← Norm2(h + MLP(h))`` with the block's
    own two norms moved after the residual adds (``norm1``/``input_layernorm``/``ln_1`` after the
    attention, the second after the MLP). No parameter is added or re-initialised: the state dict
    is the original's, so checkpoints load both ways. The official code names the Post-LN layers'
    norms ``post_attention_layernorm``/``post_feedforward_layernorm`` (keys differ from ours);
    its default α = 0.25 (e.g. 3 of 12 layers). The paper trains Mix-LN from scratch; moving
    trained pre-norms after the adds changes a pretrained model's function substantially.

    ``alpha`` in [0, 1]; ``k = 0`` leaves the model as it is (reported). Architecture change,
    not exact. ``inplace=False`` converts a deep copy.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"to_mix_ln: alpha must be a number in [0, 1] (fraction of Post-LN blocks), got {alpha!r}")
    path, blocks, kind = _find_blocks(model, "to_mix_ln")
    if not inplace:
        model = copy.deepcopy(model)
        blocks = model.get_submodule(path)
    k = math.floor(alpha * len(blocks))
    report = PlacementReport(model, f"Mix-LN (alpha={alpha:g}, k={k} of {len(blocks)})", path)
    for i, b in enumerate(blocks):
        if isinstance(b, _Placed):
            raise ValueError(f"block {path}.{i} already has placement={b.placement!r}; convert the Pre-LN original")
    for i in range(k):
        _place(blocks[i], kind, "post", f"{path}.{i}")
        what = f"Post-LN: {kind.norm1} after the attention add, {kind.norm2} after the MLP add"
        report.append(PlacementStep(f"{path}.{i}", what))
    return report


# ------------------------------------------------------------------------------------------ LayerNorm-Scaling


def to_layernorm_scaling(model: nn.Module, *, inplace: bool = True) -> PlacementReport:
    """Scale each pre-norm of block ℓ (1-based) by 1/√ℓ (LayerNorm-Scaling, arXiv:2502.05795), on an existing model.

    The block stack is found as for :func:`to_peri_ln`. Third-party norms inside the blocks (e.g.
    HF ``LlamaRMSNorm``) are first replaced by their exact normkit equivalent
    (:func:`normkit.convert.replace_norms`, checked numerically), then
    :func:`normkit.nn.apply_layernorm_scaling` turns every ``LayerNorm``/``RMSNorm`` of block ℓ
    into ``LayerNormScaling``/``RMSNormScaling`` with ``layer_index=ℓ``. The final norm is not
    scaled (as in the paper). No parameter is added; the state dict keys are unchanged. Block 1 is
    unchanged; deeper blocks' sublayers see smaller inputs, so a pretrained model's function
    changes (architecture change, not exact): the paper applies it from scratch.
    """
    path, blocks, _ = _find_blocks(model, "to_layernorm_scaling")
    if not inplace:
        model = copy.deepcopy(model)
        blocks = model.get_submodule(path)
    report = PlacementReport(model, "LayerNorm-Scaling", path)
    swapped = replace_norms(blocks, where=lambda name, m: recognise_norm(m) == "third_party")
    for r in swapped:
        if r.new is None:
            raise TypeError(f"to_layernorm_scaling: {path}.{r.name} ({r.old}) has no exact normkit equivalent: {r.note}")
        report.append(PlacementStep(f"{path}.{r.name}", f"{r.old} -> normkit {r.new} (exact, {r.note})"))
    for name, ell in apply_layernorm_scaling(blocks):
        report.append(PlacementStep(f"{path}.{name}", f"scaled by 1/sqrt({ell})"))
    return report
