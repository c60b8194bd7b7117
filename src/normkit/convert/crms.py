"""Exact Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion of whole transformers: :func:`to_pre_rmsnorm`, :func:`to_pre_crmsnorm`.

Jiang, Gu, Zhu, Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN
Transformers", NeurIPS 2023, arXiv:2305.14858. Official code: ``ZixuanJiang/pre-rmsnorm-transformer``
(``example.py`` is the float64 equivalence demo; ``torch/customized_layer.py`` the norms).

Why it is exact. In a Pre-LN transformer every norm reads the residual stream ``h`` and every
sublayer adds its output back to ``h``. If every write into the stream has zero mean over the hidden
dim d, then ``h`` has zero mean, ``Var(h) = mean(h²)`` and ``LayerNorm(h) = RMSNorm(h)`` (same eps).
A zero-mean d-vector is also determined by its first d − 1 coordinates (the last is ``−Σ``), so the
stream can be stored in d − 1 dims and normalised by CRMSNorm. The steps, per norm-reader /
stream-writer (the per-tensor algebra is :mod:`normkit.functional.crms_norm`):

1. **fold** each LayerNorm's affine into the linears that read its output:
   ``W·(γ⊙n + β) + b = (W·diag γ)·n + (b + W·β)`` (a bias is added where the reader had none);
2. **re-centre** every writer — token/position embeddings, patch projection, cls/mask token,
   attention and MLP output projections: ``W ← W − mean_d(W)``, ``b ← b − mean(b)`` (d = the
   hidden dim of that tensor);
3. replace every LayerNorm by an affine-free ``normkit.RMSNorm(d, eps)`` → **Pre-RMSNorm**;
4. for **Pre-CRMSNorm**, drop the last hidden unit of every writer (``W[:-1]``), give every reader
   ``W' = W[:, :-1] − W[:, -1:]`` and use ``normkit.CRMSNorm(d − 1, eps)``.

A tied LM head (GPT-2's ``lm_head`` ↔ ``wte``) is untied: the head gets ``γ_f`` folded in (and a
bias ``E·β_f``) while the embedding is re-centred, and ``config.tie_word_embeddings`` is set to
``False`` so transformers does not tie them again. A final norm whose output nothing reads inside
the model (a bare ``GPT2Model``/``ViTModel`` body) keeps its affine as ``RMSNorm(weight, bias)``,
still exact; Pre-CRMSNorm needs a reader to absorb the last coordinate and refuses such a model.

Supported (recognised by structure; anything else gets a ``TypeError`` that says what was expected):
HF ``GPT2LMHeadModel``/``GPT2Model``/``GPT2ForSequenceClassification``/``GPT2ForTokenClassification``,
HF ``ViTModel``/``ViTForImageClassification``, and timm-style ViTs/GPTs such as normkit's bench
models (``patch``/``embed``/``tok`` embedding, ``pos``/``cls_token`` parameters, ``blocks`` of
``norm1 → attn.qkv, attn.proj, norm2 → mlp``, final ``norm`` → ``head``). Every LayerNorm of the
model must be one of the recognised pre-norms, or the conversion refuses before changing anything.

Exactness: logits equal the original's to float64 rounding (tests: 1e-9) and to fp32 rounding
(1e-4) in eval mode. Dropout on a residual write (GPT-2's ``resid_pdrop``/``embd_pdrop``, ViT's
``hidden_dropout_prob``) zeroes single coordinates and so breaks the zero mean in training mode; the
report says so when such dropout is active. Training: an optimizer step on a Pre-RMSNorm model
moves the writers off zero mean, after which it is no longer a Pre-LN model (the official code
trains with ``LinearZeroMeanOutput``, which re-centres on the fly). A Pre-CRMSNorm model always
computes *some* Pre-LN model's function (every (d − 1)-vector is the compressed form of a zero-mean
d-vector), but training it is not training the original: the optimizer sees other parameters (the
LayerNorm affines folded into the readers, the writers' last row implied by the others), so the
gradient steps differ — one SGD step at lr 0.1 on a tiny ViT already moves the two models' logits
apart by O(1) (``tests/test_convert_crms.py``). The equivalence here is of the converted model, not
of training trajectories.

Divergence from the official code: none in the math; the official norms carry unused LN
parameters (they subclass ``nn.LayerNorm``), normkit's converted norms have none.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from normkit.nn.crms_norm import CRMSNorm
from normkit.nn.layer_norm import RMSNorm
from normkit.nn.replace import replace_modules

__all__ = ["ExactReport", "ExactStep", "measure_speedup", "to_pre_crmsnorm", "to_pre_rmsnorm"]


class ExactStep(NamedTuple):
    """One change made by the conversion: the qualified ``name`` of a module/parameter and what was done."""

    name: str
    action: str


class ExactReport(list):
    """The :class:`ExactStep` list of a conversion, with the converted ``model``, its ``architecture``
    and ``notes`` (conditions under which the equivalence does not hold, e.g. active residual dropout)."""

    def __init__(self, model: nn.Module, architecture: str, target: str) -> None:
        super().__init__()
        self.model = model
        self.architecture = architecture
        self.target = target
        self.notes: list[str] = []

    def __str__(self) -> str:
        lines = [f"{self.architecture} -> {self.target}: {len(self)} changes"]
        lines += [f"  {s.name}: {s.action}" for s in self]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ layout


class _Layout(NamedTuple):
    """Where the residual stream is written and read, by qualified name."""

    architecture: str
    d: int
    writers: list[str]  # modules (Linear, Conv1D, ConvNd, Embedding) or parameters (last dim = d)
    norms: list[tuple[str, list[str]]]  # pre-norm -> the linears reading its output (empty: the model's output)
    tied_head: str | None  # a head whose weight is shared with the token embedding, to untie


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear with weight ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def _gpt2_layout(model: nn.Module) -> _Layout | None:
    body, prefix = (model.transformer, "transformer.") if hasattr(model, "transformer") else (model, "")
    if type(body).__name__ != "GPT2Model" or not _has(body, "wte", "wpe", "h", "ln_f"):
        return None
    if hasattr(model, "multiple_choice_head"):
        raise TypeError("to_pre_rmsnorm: GPT2DoubleHeadsModel's SequenceSummary head is not supported; "
                        "expected GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification or GPT2ForTokenClassification")
    writers, norms = [f"{prefix}wte", f"{prefix}wpe"], []
    for i, blk in enumerate(body.h):
        p = f"{prefix}h.{i}."
        if hasattr(blk, "crossattention"):
            raise TypeError(f"to_pre_rmsnorm: GPT-2 cross-attention ({p}crossattention) is not supported; "
                            "expected decoder-only blocks")
        norms += [(p + "ln_1", [p + "attn.c_attn"]), (p + "ln_2", [p + "mlp.c_fc"])]
        writers += [p + "attn.c_proj", p + "mlp.c_proj"]
    head = next((h for h in ("lm_head", "score", "classifier") if isinstance(getattr(model, h, None), nn.Linear)), None)
    norms.append((prefix + "ln_f", [head] if head else []))
    tied = head if head and getattr(model, head).weight is body.wte.weight else None
    return _Layout("GPT-2 (transformers)", body.wte.embedding_dim, writers, norms, tied)


def _hf_vit_layout(model: nn.Module) -> _Layout | None:
    body, prefix = (model.vit, "vit.") if hasattr(model, "vit") else (model, "")
    if type(body).__name__ != "ViTModel" or not _has(body, "embeddings", "layers", "layernorm"):
        return None
    if hasattr(model, "decoder"):
        raise TypeError("to_pre_rmsnorm: ViTForMaskedImageModeling's convolutional decoder is not supported; "
                        "expected ViTModel or ViTForImageClassification")
    e = prefix + "embeddings."
    writers = [e + "patch_embeddings.projection", e + "cls_token", e + "position_embeddings"]
    if getattr(body.embeddings, "mask_token", None) is not None:
        writers.append(e + "mask_token")
    norms = []
    for i, _ in enumerate(body.layers):
        p = f"{prefix}layers.{i}."
        norms += [(p + "layernorm_before", [p + "attention.q_proj", p + "attention.k_proj", p + "attention.v_proj"]),
                  (p + "layernorm_after", [p + "mlp.fc1"])]
        writers += [p + "attention.o_proj", p + "mlp.fc2"]
    readers = [prefix + "pooler.dense"] if getattr(body, "pooler", None) is not None else []
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        readers.append("classifier")
    norms.append((prefix + "layernorm", readers))
    return _Layout("ViT (transformers)", body.config.hidden_size, writers, norms, None)


_EMBED_MODULES = ("patch", "embed", "tok", "tok_emb", "patch_embed")
_STREAM_PARAMS = ("pos", "pos_embed", "cls_token")
_BLOCK_CHILDREN = {"norm1", "attn", "norm2", "mlp", "drop_path", "drop_path1", "drop_path2"}


def _linear_ends(mlp: nn.Module, where: str) -> tuple[str, str]:
    """Names (inside ``mlp``) of its first and last linear: ``fc1``/``fc2`` or a Sequential's ends."""
    if _has(mlp, "fc1", "fc2"):
        return "fc1", "fc2"
    if isinstance(mlp, nn.Sequential):
        lin = [n for n, m in mlp.named_children() if isinstance(m, nn.Linear)]
        if len(lin) == 2:
            return lin[0], lin[1]
    raise TypeError(f"to_pre_rmsnorm: {where} must be an MLP with fc1/fc2 or a Sequential with two nn.Linear, "
                    f"got {type(mlp).__name__}")


def _timm_layout(model: nn.Module) -> _Layout | None:
    if not (_has(model, "blocks", "norm", "head") and isinstance(model.head, nn.Linear)):
        return None
    writers = []
    for n in _EMBED_MODULES:
        m = getattr(model, n, None)
        if isinstance(m, nn.Module):
            m, n = (m.proj, n + ".proj") if hasattr(m, "proj") else (m, n)
            if not isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise TypeError(f"to_pre_rmsnorm: embedding {n} must be a Linear/Conv/Embedding, got {type(m).__name__}")
            writers.append(n)
    writers += [n for n in _STREAM_PARAMS if isinstance(getattr(model, n, None), nn.Parameter)]
    if not writers:
        return None
    norms = []
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}."
        extra = {n for n, _ in blk.named_children()} - _BLOCK_CHILDREN
        if extra or not _has(blk, "norm1", "attn", "norm2", "mlp"):
            raise TypeError(f"to_pre_rmsnorm: block {p[:-1]} must hold norm1, attn, norm2, mlp (a plain pre-LN block); "
                            f"got children {sorted(n for n, _ in blk.named_children())}")
        qkv = ["attn.qkv"] if hasattr(blk.attn, "qkv") else [f"attn.{n}" for n in ("q", "k", "v")]
        first, last = _linear_ends(blk.mlp, p + "mlp")
        norms += [(p + "norm1", [p + q for q in qkv]), (p + "norm2", [f"{p}mlp.{first}"])]
        writers += [p + "attn.proj", f"{p}mlp.{last}"]
    norms.append(("norm", ["head"]))
    d = model.norm.normalized_shape[-1] if isinstance(model.norm, nn.LayerNorm) else -1
    return _Layout("timm-style transformer (normkit bench ViT/GPT)", d, writers, norms, None)


def _layout(model: nn.Module, verb: str) -> _Layout:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} expects an nn.Module, got {type(model).__name__}")
    for find in (_gpt2_layout, _hf_vit_layout, _timm_layout):
        lay = find(model)
        if lay is not None:
            break
    else:
        raise TypeError(
            f"{verb}: unsupported architecture {type(model).__name__}; expected a Pre-LN transformers GPT-2 "
            "(GPT2LMHeadModel, GPT2Model, GPT2For*Classification), a transformers ViT (ViTModel, "
            "ViTForImageClassification) or a timm-style model with embeddings, blocks (norm1, attn, norm2, mlp), norm and head"
        )
    mods = dict(model.named_modules())
    names = {n for n, _ in lay.norms}
    for n, _ in lay.norms:
        m = mods.get(n)
        if not isinstance(m, nn.LayerNorm) or tuple(m.normalized_shape) != (lay.d,):
            got = "missing" if m is None else f"{type(m).__name__}{tuple(getattr(m, 'normalized_shape', ()))}"
            raise TypeError(f"{verb} expects a Pre-LN model: {n} must be a LayerNorm over the hidden size ({lay.d},), got {got}")
    stray = [n for n, m in mods.items() if isinstance(m, nn.LayerNorm) and n not in names]
    if stray:
        raise TypeError(f"{verb}: LayerNorms outside the recognised pre-norm layout ({', '.join(stray)}); "
                        "refusing an inexact conversion")
    for n in [r for _, rs in lay.norms for r in rs] + [w for w in lay.writers if w in mods]:
        if not (isinstance(mods.get(n), (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_conv1d(mods.get(n))):
            raise TypeError(f"{verb}: {n} must be a Linear/Conv1D/Conv/Embedding, got {type(mods.get(n)).__name__}")
    return lay


# ------------------------------------------------------------------------------------------ tensor surgery


def _hidden_dim(m: nn.Module | None, role: str) -> int:
    """The dim of ``m.weight`` (or of a bare parameter) that is the stream's hidden dim."""
    if m is None:  # a parameter added to the stream: (..., d)
        return -1
    if _is_conv1d(m):
        return 1 if role == "writer" else 0
    if isinstance(m, nn.Embedding):
        return 1
    return 0 if role == "writer" else 1  # Linear / ConvNd weight (out, in, ...)


def _put(owner: nn.Module, attr: str, value: Tensor, like: Tensor | None) -> None:
    """Set ``owner.attr`` to a new Parameter holding ``value`` in ``like``'s dtype (breaks any tying).

    Always a fresh contiguous copy: a narrowed writer (``W[:, :-1]`` of a ``(V, d)`` embedding or a
    GPT-2 ``Conv1D``) would otherwise be a strided view keeping the old storage alive, and slow GEMMs.
    """
    dtype = like.dtype if like is not None else value.dtype
    grad = like.requires_grad if like is not None else True
    data = value.detach().to(dtype).clone(memory_format=torch.contiguous_format)
    setattr(owner, attr, nn.Parameter(data, requires_grad=grad))


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module | None, nn.Module, str]:
    """``(module or None, owner, attr)``: a module writer/reader, or a bare parameter's owner and name."""
    mods = dict(model.named_modules())
    if name in mods:
        return mods[name], mods[name], "weight"
    owner, _, attr = name.rpartition(".")
    return None, mods[owner], attr


def _fold(model: nn.Module, norm: nn.LayerNorm, readers: list[str]) -> None:
    """``W ← W·diag(γ)``, ``b ← b + W·β`` for each reader (float64 math, stored in the reader's dtype)."""
    g = None if norm.weight is None else norm.weight.detach().double() + float(getattr(norm, "weight_offset", 0.0))
    beta = None if norm.bias is None else norm.bias.detach().double()
    for r in readers:
        m, _, _ = _resolve(model, r)
        ax = _hidden_dim(m, "reader")
        w = m.weight.detach().double()
        shape = [1] * w.dim()
        shape[ax] = -1
        new_w = w if g is None else w * g.view(shape)
        b = m.bias.detach().double() if m.bias is not None else None
        if beta is not None:
            shift = w @ beta if ax == 1 else beta @ w
            b = shift if b is None else b + shift
        _put(m, "weight", new_w, m.weight)
        if b is not None:
            _put(m, "bias", b, m.bias if m.bias is not None else m.weight)


def _center(model: nn.Module, name: str) -> None:
    m, owner, attr = _resolve(model, name)
    ax = _hidden_dim(m, "writer")
    w = getattr(owner, attr).detach().double()
    _put(owner, attr, w - w.mean(ax, keepdim=True), getattr(owner, attr))
    if m is not None and getattr(m, "bias", None) is not None and not isinstance(m, nn.Embedding):
        b = m.bias.detach().double()
        _put(m, "bias", b - b.mean(), m.bias)


def _set_width(m: nn.Module, role: str, width: int) -> None:
    """Keep a module's size attributes (``out_features``, ``nf``, ...) in step with its weight."""
    if _is_conv1d(m):
        setattr(m, "nf" if role == "writer" else "nx", width)
    elif isinstance(m, nn.Linear):
        setattr(m, "out_features" if role == "writer" else "in_features", width)
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = width
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.out_channels = width


def _compress_writer(model: nn.Module, name: str) -> None:
    m, owner, attr = _resolve(model, name)
    ax = _hidden_dim(m, "writer")
    w = getattr(owner, attr)
    _put(owner, attr, w.detach().narrow(ax, 0, w.shape[ax] - 1), w)
    if m is not None:
        if getattr(m, "bias", None) is not None and not isinstance(m, nn.Embedding):
            _put(m, "bias", m.bias.detach()[:-1], m.bias)
        _set_width(m, "writer", w.shape[ax] - 1)


def _compress_reader(model: nn.Module, name: str) -> None:
    m, _, _ = _resolve(model, name)
    ax = _hidden_dim(m, "reader")
    w = m.weight.detach().double()
    d = w.shape[ax]
    new = w.narrow(ax, 0, d - 1) - w.narrow(ax, d - 1, 1)
    _put(m, "weight", new, m.weight)
    _set_width(m, "reader", d - 1)


# ------------------------------------------------------------------------------------------ the verbs


def _active_residual_dropout(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0 and "attn_dropout" not in n]


def _untie(model: nn.Module, lay: _Layout, report: ExactReport) -> None:
    if lay.tied_head is not None:
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
        report.append(ExactStep(lay.tied_head, f"untied from {lay.writers[0]} (config.tie_word_embeddings=False)"))


def _convert(model: nn.Module, verb: str, compress: bool, inplace: bool) -> ExactReport:
    lay = _layout(model, verb)
    if compress:
        bare = [n for n, rs in lay.norms if not rs]
        if bare:
            raise TypeError(f"{verb}: {bare[0]}'s output is the model's output (no linear reads it), so the dropped coordinate "
                            "cannot be absorbed; convert a model with a head (e.g. GPT2LMHeadModel, ViTForImageClassification), "
                            "or use to_pre_rmsnorm")
    if not inplace:
        model = copy.deepcopy(model)
    report = ExactReport(model, lay.architecture, "Pre-CRMSNorm" if compress else "Pre-RMSNorm")
    _untie(model, lay, report)
    mods = dict(model.named_modules())
    new_norms: dict[int, nn.Module] = {}
    with torch.no_grad():
        for n, readers in lay.norms:
            ln = mods[n]
            affine = ln.weight is not None or ln.bias is not None
            eps = float(ln.eps)
            if readers:
                if affine:
                    _fold(model, ln, readers)
                    report.append(ExactStep(n, f"affine folded into {', '.join(readers)}"))
                new: nn.Module = RMSNorm(lay.d, eps, elementwise_affine=False)
            else:  # the model's output: keep the affine on the RMSNorm (exact: its input has zero mean)
                new = RMSNorm(lay.d, eps, elementwise_affine=ln.weight is not None, bias=ln.bias is not None)
                if ln.weight is not None:
                    new.weight.copy_(ln.weight + float(getattr(ln, "weight_offset", 0.0)))
                if ln.bias is not None:
                    new.bias.copy_(ln.bias)
            new_norms[id(ln)] = new
        for w in lay.writers:
            _center(model, w)
            report.append(ExactStep(w, "re-centred (zero mean over the hidden dim)"))
        if compress:
            for w in lay.writers:
                _compress_writer(model, w)
                report.append(ExactStep(w, f"last hidden unit dropped ({lay.d} -> {lay.d - 1})"))
            for n, readers in lay.norms:
                for r in readers:
                    _compress_reader(model, r)
                    report.append(ExactStep(r, f"reads the compressed stream: W[:, :-1] - W[:, -1:] ({lay.d} -> {lay.d - 1})"))
                new_norms[id(mods[n])] = CRMSNorm(lay.d - 1, float(mods[n].eps))
    done = replace_modules(model, lambda name, m: id(m) in new_norms, lambda name, m: new_norms[id(m)])
    for name, old, new_type in done:
        report.append(ExactStep(name, f"{old.__name__} -> {new_type.__name__}"))
    drop = _active_residual_dropout(model)
    if drop:
        report.notes.append(f"dropout with p > 0 ({len(drop)} modules, e.g. {drop[0]}) breaks the zero mean of residual "
                            "writes in training mode: the conversion is exact in eval mode (or with p = 0)")
    if not compress:
        report.notes.append("an optimizer step moves the writers off zero mean, after which LayerNorm = RMSNorm no "
                            "longer holds; re-centre them after each step to keep a Pre-LN-equivalent model")
    return report


def to_pre_rmsnorm(model: nn.Module, *, inplace: bool = True) -> ExactReport:
    """Convert a Pre-LN transformer into the equivalent Pre-RMSNorm one (Jiang et al. 2023, arXiv:2305.14858).

    Folds every pre-norm's affine into the linears reading it, re-centres every residual-stream
    writer and replaces each ``LayerNorm(d)`` by an affine-free ``normkit.RMSNorm(d, eps)`` (same
    eps). Outputs are unchanged in eval mode (float64: to rounding; see the module docstring for
    what is supported and for dropout/training). Parameters are replaced by new ones: build the
    optimizer after converting.

    Args:
        model: a supported Pre-LN model (module docstring); anything else raises ``TypeError``.
        inplace: ``False`` converts a deep copy and leaves ``model`` untouched.

    Returns:
        :class:`ExactReport` of every change (``.model`` is the converted model).
    """
    return _convert(model, "to_pre_rmsnorm", compress=False, inplace=inplace)


def to_pre_crmsnorm(model: nn.Module, *, inplace: bool = True) -> ExactReport:
    """Convert a Pre-LN transformer into the equivalent Pre-CRMSNorm one (hidden width d → d − 1).

    :func:`to_pre_rmsnorm`'s steps, then the paper's lossless compression: every writer drops its
    last hidden unit, every reader gets ``W[:, :-1] − W[:, -1:]`` and every norm becomes
    ``normkit.CRMSNorm(d − 1, eps)``. The residual stream, the embeddings and the hidden states
    the model returns are then (d − 1)-wide; the logits are unchanged. The model's
    ``config.hidden_size`` (if any) is left as it was: it describes the Pre-LN original.
    """
    return _convert(model, "to_pre_crmsnorm", compress=True, inplace=inplace)


# ------------------------------------------------------------------------------------------ timing


def measure_speedup(
    model: nn.Module,
    inputs: Tensor,
    loss: Callable[[Any], Tensor] | None = None,
    *,
    reps: int = 20,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Median milliseconds of inference and of a train step (forward + backward + SGD step) of
    ``model`` as given (Pre-LN), its Pre-RMSNorm and its Pre-CRMSNorm conversions, on copies.

    ``loss(output) -> scalar`` (default: the mean of the output, or of ``output.logits``). The
    norms run on normkit's default backend (``auto``: its C++ kernels on CPU where they are
    faster, see :mod:`normkit.backend`). The three models are timed in turn within each
    repetition (round robin), so a change in machine load affects them alike. Returns
    ``{"pre_ln"|"pre_rms"|"pre_crms": {"infer_ms", "train_ms", "infer_speedup", "train_speedup"}}``
    with speedups relative to ``pre_ln``. Dropout is turned off (every dropout p = 0).
    """
    loss = loss or (lambda out: getattr(out, "logits", out).float().mean())
    variants = {"pre_ln": copy.deepcopy(model),
                "pre_rms": to_pre_rmsnorm(model, inplace=False).model,
                "pre_crms": to_pre_crmsnorm(model, inplace=False).model}
    opts = {}
    for key, m in variants.items():
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
        opts[key] = torch.optim.SGD(m.parameters(), lr=1e-6)

    def infer(key: str) -> None:
        with torch.no_grad():
            variants[key](inputs)

    def step(key: str) -> None:
        opts[key].zero_grad(set_to_none=True)
        loss(variants[key](inputs)).backward()
        opts[key].step()

    times: dict[str, dict[str, list[float]]] = {k: {"infer_ms": [], "train_ms": []} for k in variants}
    for what, fn, train in (("infer_ms", infer, False), ("train_ms", step, True)):
        for m in variants.values():
            m.train(train)
        for i in range(warmup + reps):
            for key in variants:
                t0 = time.perf_counter()
                fn(key)
                if i >= warmup:
                    times[key][what].append(1e3 * (time.perf_counter() - t0))
    rows = {k: {w: sorted(v)[len(v) // 2] for w, v in t.items()} for k, t in times.items()}
    base = rows["pre_ln"]
    for r in rows.values():
        r["infer_speedup"] = base["infer_ms"] / r["infer_ms"]
        r["train_speedup"] = base["train_ms"] / r["train_ms"]
    return rows


def _main() -> None:  # pragma: no cover - timing, run by hand: python -m normkit.convert.crms
    """Print the speedups of Pre-RMSNorm/Pre-CRMSNorm over Pre-LN for a small GPT-2 and ViT (transformers, random weights)."""
    import argparse

    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000, n_positions=128))
    vit = ViTForImageClassification(ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                              intermediate_size=768, image_size=32, patch_size=4, num_labels=10))
    cases = {"GPT-2 d=256 L=4, batch 8x128 tokens": (gpt, torch.randint(0, 1000, (8, 128))),
             "ViT d=192 L=4, batch 32x65 tokens": (vit, torch.randn(32, 3, 32, 32))}
    print(f"torch threads: {torch.get_num_threads()}; median of {args.reps} (ms); speedup vs Pre-LN")
    for title, (model, x) in cases.items():
        rows = measure_speedup(model, x, reps=args.reps)
        print(title)
        for key, r in rows.items():
            print(f"  {key:9s} infer {r['infer_ms']:8.2f} ms ({r['infer_speedup']:.2f}x)   "
                  f"train step {r['train_ms']:8.2f} ms ({r['train_speedup']:.2f}x)")


if __name__ == "__main__":  # pragma: no cover
    _main()
