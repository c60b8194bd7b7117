"""Fold eval-mode norms into the adjacent convolution or linear layer: :func:`fold_norms`.

In eval mode BatchNorm — and every normkit norm whose eval form is a per-channel affine map — is
``y = a · x + c`` per channel. Next to a ``Conv``/``Linear`` that map is absorbed into the layer's
weight and bias (the "deploy mode" of You et al., "Efficient ConvBN Blocks for Transfer Learning and
Beyond", ICLR 2024, arXiv:2305.11624, and torch's ``fuse_conv_bn_eval``)::

    after  (layer → norm):   W' = a[o] · W[o, ...],            b' = a · b + c
    before (norm → layer):   W' = W[o, i, ...] · a[i],         b' = b + Σ_{i,k} W[o, i, k] · c[i]

The new weights are computed in float64 and rounded once to the layer's dtype, so the folded model
equals the original to the rounding of its dtype. Folding *before* a convolution is only exact without
zero padding: the unfolded model pads the norm's *output*, so a border tap sees 0, while the folded
convolution pads the norm's *input* and adds ``Σ W·c`` to every position, as if the tap saw ``c``.
So a zero-padded convolution is refused in that direction unless the shift ``c`` is exactly 0
(``padding_mode`` reflect/replicate/circular pads with copies of the input and folds exactly).
A layer whose parameters something else also uses (a module registered twice, tied weights, a
forward that reads ``self.fc.weight`` itself) is never folded into: the fold would change that use too.

**Eval forms** (each read from the module's code, and written out again in ``tests/test_fold.py``):

=========================  ==========================================================  ==========
norm                       eval map ``a · x + c`` per channel                          sides
=========================  ==========================================================  ==========
BatchNorm (torch's, and    ``a = w/√(σ²+eps)``, ``c = b − a·μ`` (running statistics;    both
normkit's BatchNorm,       ``track_running_stats=False`` uses batch statistics in
GhostBN, BatchRenorm)      eval: not foldable)
EstBN                      same, with its running estimates                            both
RepBN (SLAB)               ``a = γ/√(σ²+eps) + α``, ``c = β − γμ/√(σ²+eps)``           both
PRepBN                     its RepBN (the official eval path; with ``eval_mix=True``    both
                           only once λ = 0, i.e. after its schedule)
UnifiedNorm                ``a = w/√(running_var+eps)``, ``c = b``                      both
PowerNorm                  GroupScaling, then ``a = w/√(running_phi+eps)``, ``c = b``:  before
                           the affine folds into the *following* linear and the
                           GroupScaling stays (``num_groups=None``: both sides)
BatchChannelNorm           its BN part (``pbn``) folds into the *preceding* layer; the  after
                           per-sample group norm stays
EvoNorm-B0                 ``apply_act=False`` only: ``a = γ``, ``c = β``              both
=========================  ==========================================================  ==========

Anything else (LayerNorm, GroupNorm, InstanceNorm, EvoNorm-B0 with its activation, ...) is not a
per-channel affine map and is reported as not foldable. Before folding, each norm's eval output is
also checked against its map on a random float64 input (:func:`verify_eval_affine`), so a subclass
that computes something else in eval mode is refused rather than folded wrongly.

**Adjacency** is read from a ``torch.fx`` trace (as torch's and Apple's tune-mode passes): a norm
folds *after* a Conv/Linear whose output only it consumes, or *before* a Conv/Linear whose input is
only its output, each called once. Norms, convolutions and linears are leaves of the trace; every
other module is traced through. A model that ``torch.fx`` cannot trace as a whole (data-dependent
control flow, e.g. transformers' top-level ``forward``) is traced **per submodule**: its largest
traceable submodules (e.g. each ``ResNetConvLayer``) are traced on their own, and pairs that cross
their boundaries are missed (reported as not folded). If nothing traces, the **Sequential rule**:
consecutive children of an ``nn.Sequential``; pairs wired in a custom ``forward`` are then not seen.
``report.adjacency`` says which was used. Without ``example_inputs`` (and always per submodule) the
rank of a Linear's output is not known (see below).

Channel layouts: channels-first norms (BatchNorm, EstBN, BCN, EvoNorm) pair with convolutions
(channel dim 1) and with a Linear only on ``(N, C)`` features; channels-last norms (RepBN, PRepBN,
UN, PowerNorm, normkit ``BatchNorm(channels_last=True)``) pair with Linears. With
``example_inputs`` the fx trace records shapes and the ``(N, C)`` condition is checked (and the
folded model is compared with the original on those inputs: ``report.max_abs_diff``); without them a
channels-first norm next to a Linear is assumed to see ``(N, C)`` features, and the report says so.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.functional.power_norm import group_scaling
from normkit.nn.batch_channel_norm import BatchChannelNorm, EstBN
from normkit.nn.evonorm import EvoNormB0
from normkit.nn.power_norm import PowerNorm
from normkit.nn.rep_batch_norm import PRepBN, RepBN
from normkit.nn.unified_norm import UnifiedNorm
from normkit.registry import Paper, norm_info_of

__all__ = [
    "EFFICIENT_CONVBN",
    "EvalAffine",
    "FoldReport",
    "Folded",
    "NotFoldableError",
    "NotFolded",
    "eval_affine",
    "fold_norms",
    "verify_eval_affine",
]

EFFICIENT_CONVBN = Paper(
    "Efficient ConvBN Blocks for Transfer Learning and Beyond", 2024, "2305.11624",
    "You, Qin, Bao, Cao, Huang, Shan, Long",
)  # fmt: skip

Side = Literal["after", "before"]
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = nn.modules.conv._ConvTransposeNd
_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.instancenorm._InstanceNorm)


class NotFoldableError(ValueError):
    """A norm whose eval form is not a per-channel affine map (the message says why)."""


@dataclass
class EvalAffine:
    """The eval map of a norm as ``y = scale · x + shift`` per channel (float64, shape ``(C,)``).

    ``layout``: where the channels are (``"channels_first"``: dim 1; ``"channels_last"``: dim -1);
    ``sides``: where it may fold (``"after"`` a producing layer, ``"before"`` a consuming one);
    ``remainder``: builds what stays in the norm's place after folding (default ``nn.Identity``).
    """

    scale: Tensor
    shift: Tensor
    layout: str
    sides: tuple[str, ...] = ("after", "before")
    remainder: Callable[[], nn.Module] = nn.Identity


class _GroupScaling(nn.Module):
    """PowerNorm's GroupScaling alone (what stays after its affine is folded): ``x / √(mean_group(x²) + eps)``."""

    def __init__(self, num_groups: int, eps: float, stats_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.num_groups, self.eps, self.stats_dtype = num_groups, eps, stats_dtype

    def forward(self, x: Tensor) -> Tensor:
        from normkit.stats import accumulation_dtype

        return group_scaling(x.to(accumulation_dtype(x.dtype, self.stats_dtype)), self.num_groups, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, eps={self.eps}"


def _f64(t: Tensor | None, like: Tensor, fill: float) -> Tensor:
    return torch.full_like(like, fill) if t is None else t.detach().to(torch.float64).reshape(-1)


def _bn_affine(m: nn.Module, mean: Tensor | None, var: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    if mean is None or var is None:
        raise NotFoldableError(f"{what} has no running statistics (track_running_stats=False): eval uses batch statistics")
    v = var.detach().to(torch.float64)
    inv = torch.rsqrt(v + m.eps)
    a = _f64(m.weight, inv, 1.0) * inv
    return a, _f64(m.bias, inv, 0.0) - a * mean.detach().to(torch.float64)


def eval_affine(m: nn.Module) -> EvalAffine:
    """The per-channel affine map ``m`` computes in eval mode; raises :class:`NotFoldableError` with the reason otherwise."""
    name = type(m).__name__
    if isinstance(m, _BatchNorm):  # torch's BatchNorm*d/SyncBatchNorm, normkit's BatchNorm, GhostBN, BatchRenorm
        a, c = _bn_affine(m, m.running_mean, m.running_var, name)
        return EvalAffine(a, c, "channels_last" if getattr(m, "channels_last", False) else "channels_first")
    if isinstance(m, EstBN):
        a, c = _bn_affine(m, m.running_mean, m.running_var, name)
        return EvalAffine(a, c, "channels_first")
    if isinstance(m, PRepBN):
        if m.eval_mix and (int(m.warm) > 0 or int(m.iter) > 0):
            raise NotFoldableError(
                f"PRepBN(eval_mix=True) mid-schedule (warm={int(m.warm)}, iter={int(m.iter)}): eval mixes in LayerNorm "
                "(λ > 0); it folds once λ = 0"
            )
        return eval_affine(m.norm2)
    if isinstance(m, RepBN):
        bn = m.bn
        g, s = bn.running_mean.detach().to(torch.float64), torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
        gamma, beta = _f64(bn.weight, s, 1.0), _f64(bn.bias, s, 0.0)
        return EvalAffine(gamma * s + float(m.alpha.detach()), beta - gamma * s * g, "channels_last")
    if isinstance(m, UnifiedNorm):
        s = torch.rsqrt(m.running_var.detach().to(torch.float64) + m.eps)
        return EvalAffine(_f64(m.weight, s, 1.0) * s, _f64(m.bias, s, 0.0), "channels_last")
    if isinstance(m, PowerNorm):
        s = torch.rsqrt(m.running_phi.detach().to(torch.float64) + m.eps)
        a, c = _f64(m.weight, s, 1.0) * s, _f64(m.bias, s, 0.0)
        if m.num_groups is None:
            return EvalAffine(a, c, "channels_last")
        groups, eps, sd = m.num_groups, m.group_eps, m.stats_dtype
        return EvalAffine(a, c, "channels_last", ("before",), lambda: _GroupScaling(groups, eps, sd))
    if isinstance(m, BatchChannelNorm):
        inner = eval_affine(m.pbn)

        def keep_group_norm() -> nn.Module:
            m.pbn = nn.Identity()
            return m

        return EvalAffine(inner.scale, inner.shift, "channels_first", ("after",), keep_group_norm)
    if isinstance(m, EvoNormB0):
        if m.apply_act:
            raise NotFoldableError("EvoNorm-B0 with apply_act=True divides by max(√(var+eps), v·x + per-sample std): not affine")
        w = m.weight.detach().to(torch.float64)
        return EvalAffine(w.clone(), _f64(m.bias, w, 0.0), "channels_first")
    if norm_info_of(m) is not None or isinstance(m, _TORCH_NORMS):
        raise NotFoldableError(f"{name} is not a per-channel affine map in eval mode (its statistics depend on the input)")
    raise NotFoldableError(f"{name} is not a normalization layer")


def _sample_input(m: nn.Module, layout: str, c: int) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    if layout == "channels_last":
        shape: tuple[int, ...] = (2, 3, c)
    elif isinstance(m, nn.BatchNorm1d):
        shape = (4, c)
    elif isinstance(m, nn.BatchNorm3d):
        shape = (2, c, 2, 2, 2)
    else:
        shape = (2, c, 3, 3)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def verify_eval_affine(m: nn.Module, aff: EvalAffine | None = None) -> float:
    """Run (a float64 copy of) ``m`` in eval mode on a random input and compare it with its :func:`eval_affine`
    map; returns the largest difference, raises :class:`NotFoldableError` if it exceeds 1e-9 (a subclass that
    changes the eval computation, or an eval form this module does not know)."""
    aff = aff or eval_affine(m)
    probe = m.pbn if isinstance(m, BatchChannelNorm) else m
    ref = copy.deepcopy(probe).to(torch.float64).eval()
    device = next((t.device for t in [*ref.parameters(), *ref.buffers()]), torch.device("cpu"))
    x = _sample_input(probe, aff.layout, aff.scale.numel()).to(device)
    inner = x
    if isinstance(m, PowerNorm) and m.num_groups is not None:
        inner = aff.remainder()(x)
    dim = -1 if aff.layout == "channels_last" else 1
    want = inner * _channel_view(aff.scale.to(device), dim, x.dim()) + _channel_view(aff.shift.to(device), dim, x.dim())
    with torch.no_grad():
        got = ref(x)
    worst = float((got - want).abs().max())
    if not worst <= 1e-9:
        what = f"{type(m).__name__}'s eval output"
        raise NotFoldableError(f"{what} differs from its per-channel affine form (max |Δ| = {worst:.3g})")
    return worst


# ---------------------------------------------------------------------------------- report


class Folded(tuple):
    """One fold: ``(norm, into, side, note)`` — the norm's name, the layer it went into, ``"after"``/``"before"``."""

    __slots__ = ()

    def __new__(cls, norm: str, into: str, side: str, note: str = "") -> Folded:
        return super().__new__(cls, (norm, into, side, note))

    norm = property(lambda self: self[0])
    into = property(lambda self: self[1])
    side = property(lambda self: self[2])
    note = property(lambda self: self[3])


class NotFolded(tuple):
    """A norm left in place: ``(name, kind, reason)``."""

    __slots__ = ()

    def __new__(cls, name: str, kind: str, reason: str) -> NotFolded:
        return super().__new__(cls, (name, kind, reason))

    name = property(lambda self: self[0])
    kind = property(lambda self: self[1])
    reason = property(lambda self: self[2])


@dataclass
class FoldReport:
    """What :func:`fold_norms` did: ``model`` (the folded model), ``folded``, ``not_folded`` (with
    reasons), ``adjacency`` (``"fx"`` or ``"sequential"``) and ``max_abs_diff`` (folded vs original on
    ``example_inputs``; ``None`` without them)."""

    model: nn.Module
    folded: list[Folded] = field(default_factory=list)
    not_folded: list[NotFolded] = field(default_factory=list)
    adjacency: str = "fx"
    max_abs_diff: float | None = None

    def __iter__(self):  # noqa: ANN204  (model, report) unpacking
        return iter((self.model, self))

    def __str__(self) -> str:
        lines = [f"{len(self.folded)} norms folded, {len(self.not_folded)} not (adjacency: {self.adjacency})"]
        lines += [f"  {f.norm} -> {f.into} ({f.side}{': ' + f.note if f.note else ''})" for f in self.folded]
        lines += [f"  {n.name}: {n.kind} kept: {n.reason}" for n in self.not_folded]
        if self.max_abs_diff is not None:
            lines.append(f"  max |folded - original| on example_inputs: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- the layers


def _plain_layer(m: nn.Module) -> str | None:
    """Why ``m`` cannot take a fold (``None``: it can): Linear/Conv{1,2,3}d whose forward is torch's own."""
    if isinstance(m, nn.Linear):
        return None if type(m).forward is nn.Linear.forward else f"{type(m).__name__} overrides Linear.forward"
    if isinstance(m, _CONVS):
        base = next(c for c in _CONVS if isinstance(m, c))
        if type(m).forward is not base.forward or type(m)._conv_forward is not base._conv_forward:
            return f"{type(m).__name__} overrides the convolution (e.g. weight standardization): folding would change it"
        return None
    if isinstance(m, _CONV_T):
        return f"{type(m).__name__}: transposed convolutions are not folded into (weight layout (in, out/groups, *k))"
    return f"{type(m).__name__} is not a Linear or Conv1d/2d/3d"


def _channel_view(t: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)


@torch.no_grad()
def _fold_after(layer: nn.Module, aff: EvalAffine) -> None:
    w = layer.weight
    wd = w.detach().to(torch.float64)
    b = torch.zeros(wd.shape[0], dtype=torch.float64, device=w.device) if layer.bias is None else layer.bias.detach().double()
    a, c = aff.scale.to(w.device), aff.shift.to(w.device)
    w.copy_((wd * _channel_view(a, 0, wd.dim())).to(w.dtype))
    new_b = (a * b + c).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b)


@torch.no_grad()
def _fold_before(layer: nn.Module, aff: EvalAffine) -> None:
    w = layer.weight
    wd = w.detach().to(torch.float64)
    a, c = aff.scale.to(w.device), aff.shift.to(w.device)
    out = wd.shape[0]
    b = torch.zeros(out, dtype=torch.float64, device=w.device) if layer.bias is None else layer.bias.detach().double()
    if isinstance(layer, nn.Linear):
        new_w, new_b = wd * a, b + wd @ c
    else:  # (out, in/g, *k): group g of the output reads input channels g·in/g ... (g+1)·in/g − 1
        g = layer.groups
        wg = wd.reshape(g, out // g, wd.shape[1], *wd.shape[2:])
        ag = a.reshape(g, 1, -1, *([1] * (wd.dim() - 2)))
        cg = c.reshape(g, 1, -1, *([1] * (wd.dim() - 2)))
        new_w = (wg * ag).reshape(wd.shape)
        new_b = b + (wg * cg).sum(dim=tuple(range(2, wg.dim()))).reshape(out)
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(w.dtype))


def _zero_padding(conv: nn.Module) -> bool:
    """Whether folding before ``conv`` is exact: no padding, or padding that copies the input
    (reflect/replicate/circular commute with a per-channel affine map; zeros do not)."""
    if conv.padding_mode != "zeros":
        return True
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(int(v) == 0 for v in p)


def _pair_problem(layer: nn.Module, aff: EvalAffine, side: Side, norm_rank: int | None) -> str | None:
    """Why ``layer`` and the norm cannot fold on ``side`` (``None``: they can)."""
    why = _plain_layer(layer)
    if why:
        return why
    if side not in aff.sides:
        return f"its eval map only folds {' or '.join(aff.sides)} a layer"
    conv = isinstance(layer, _CONVS)
    if conv and aff.layout == "channels_last":
        return "channels-last norm next to a convolution (channels are dim 1 there)"
    if not conv and aff.layout == "channels_first" and norm_rank is not None and norm_rank != 2:
        return f"channels-first norm on a {norm_rank}-D Linear output: its channels are not the Linear's features"
    features = layer.out_channels if conv else (layer.out_features if side == "after" else layer.in_features)
    if conv and side == "before":
        features = layer.in_channels
    if features != aff.scale.numel():
        return f"{features} features in the layer, {aff.scale.numel()} in the norm"
    if conv and side == "before" and not _zero_padding(layer) and bool((aff.shift != 0).any()):
        # the padded border sees 0 where the unfolded model sees the norm's shift c (a·0 + c); with c = 0 both are 0
        return f"folding before a zero-padded convolution (padding={layer.padding}) is not exact: the norm's shift is not 0"
    return None


# ---------------------------------------------------------------------------------- adjacency


class _Tracer(fx.Tracer):
    """Norms, convolutions and linears are leaves; everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*_CONVS, _CONV_T, nn.Linear, _BatchNorm, *_TORCH_NORMS)) or norm_info_of(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class _Pair:
    norm: str
    layer: str
    side: Side
    norm_rank: int | None
    blocked: str | None = None  # why the pair must not fold although adjacent (its parameters are read elsewhere)


_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})
_METADATA_METHODS = frozenset({"size", "dim"})


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (``x.shape``, ``x.size()``, ``x.dim()`` only read metadata,
    which a fold leaves unchanged)."""

    def metadata(u: fx.Node) -> bool:
        if u.op == "call_function" and u.target is getattr:  # fx records ``x.shape`` as getattr(x, "shape")
            return len(u.args) > 1 and u.args[1] in _METADATA_ATTRS
        return u.op == "call_method" and u.target in _METADATA_METHODS

    return [u for u in node.users if not metadata(u)]


def _fx_pairs(model: nn.Module, example_inputs: Sequence[Any] | None) -> list[_Pair]:
    """Candidate (norm, layer, side) pairs from an fx trace of ``model`` (raises if it cannot be traced)."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    ranks: dict[str, int] = {}
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape") and node.args and isinstance(node.args[0], fx.Node):
                arg_meta = node.args[0].meta.get("tensor_meta")
                if arg_meta is not None and hasattr(arg_meta, "shape"):
                    ranks[node.target] = len(arg_meta.shape)
    # modules whose parameters or buffers the forward also reads directly (``x @ self.fc.weight.T``): a fold
    # would change (or, for the norm, remove) what that read sees
    read = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    pairs: list[_Pair] = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        src = node.args[0]
        rank = ranks.get(node.target)
        if isinstance(src, fx.Node) and src.op == "call_module" and _value_users(src) == [node] and calls[src.target] == 1:
            direct = [t for t in (src.target, node.target) if t in read]
            blocked = f"the forward also reads {direct[0]}'s parameters directly" if direct else None
            pairs.append(_Pair(node.target, src.target, "after", rank, blocked))  # src → node: node may fold after src
            pairs.append(_Pair(src.target, node.target, "before", ranks.get(src.target), blocked))  # src may fold before node
    return pairs


def _traced_pairs(model: nn.Module, example_inputs: Sequence[Any] | None) -> tuple[list[_Pair], str]:
    """Pairs from an fx trace of ``model``; if it cannot be traced, from traces of its largest traceable
    submodules (pairs that cross their boundaries are then missed). Returns the pairs and how they were found."""
    try:
        return _fx_pairs(model, example_inputs), "fx"
    except Exception:  # noqa: BLE001  (any tracing failure: trace the children instead)
        pass
    pairs: list[_Pair] = []
    traced: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if next(child.children(), None) is None:
                continue
            try:
                found = _fx_pairs(child, None)
            except Exception:  # noqa: BLE001
                visit(child, full)
                continue
            traced.append(full)
            pairs.extend(_Pair(f"{full}.{p.norm}", f"{full}.{p.layer}", p.side, p.norm_rank) for p in found)

    visit(model, "")
    if not traced:
        raise ValueError(f"torch.fx could not trace {type(model).__name__} nor any of its submodules")
    return pairs, "fx per submodule (the model itself is not traceable)"


def _sequential_pairs(model: nn.Module) -> list[_Pair]:
    """Consecutive children of every ``nn.Sequential`` (a module listed twice in one Sequential is listed
    at each place, so that :func:`aliased_modules` sees it)."""
    pairs: list[_Pair] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = [(f"{prefix}.{n}" if prefix else n) for n in seq._modules]
        for first, second in zip(names, names[1:]):
            pairs.append(_Pair(second, first, "after", None))
            pairs.append(_Pair(first, second, "before", None))
    return pairs


def aliased_modules(model: nn.Module, *, tied: bool = True) -> dict[int, str]:
    """``id(module) -> reason`` for every module that a fold or a patch would change in more than one place:
    registered under several names (one object called at several places, which a per-submodule trace or the
    Sequential rule cannot see), or (``tied=True``) holding a parameter that another module also holds."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name or "<root>")
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    out = {k: f"the same module is registered as {', '.join(v)}" for k, v in names.items() if len(v) > 1}
    if not tied:
        return out
    for m in model.modules():
        if id(m) in out:
            continue
        shared = next((h for p in m.parameters(recurse=False) if len(h := holders[id(p)]) > 1), None)
        if shared:
            out[id(m)] = f"its parameter is shared (tied) between {', '.join(shared)}"
    return out


# ---------------------------------------------------------------------------------- the verb


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization layer (torch's classes and registered norms), outermost only, by name."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in found):
            continue
        if isinstance(m, (_BatchNorm, *_TORCH_NORMS)) or norm_info_of(m) is not None:
            found[name] = m
    return found


def _foldable(m: nn.Module) -> bool:
    try:
        eval_affine(m)
    except NotFoldableError:
        return False
    return True


def _outputs(model: nn.Module, inputs: Sequence[Any]) -> list[Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, Tensor)]
    logits = getattr(out, "logits", None)
    return [logits] if isinstance(logits, Tensor) else []


def fold_norms(
    model: nn.Module,
    *,
    example_inputs: Sequence[Any] | Tensor | None = None,
    sides: Sequence[str] = ("after", "before"),
    inplace: bool = False,
    adjacency: Literal["auto", "fx", "sequential"] = "auto",
) -> FoldReport:
    """Fold every eval-mode norm with a per-channel affine eval form into its adjacent Conv/Linear.

    Args:
        model: an ``nn.Module`` in eval mode (every norm considered must be in eval mode: a norm in
            training mode raises ``ValueError``, since its training output uses batch statistics).
        example_inputs: optional positional inputs (a tensor or a tuple): shapes are recorded during
            the fx trace (checks that a channels-first norm next to a Linear sees ``(N, C)``) and the
            folded model is compared with the original on them (``report.max_abs_diff``).
        sides: where a norm may fold, tried in this order: ``"after"`` (into the layer that produces
            its input) and/or ``"before"`` (into the layer that consumes its output).
        inplace: fold into ``model`` itself; by default a deep copy is folded (as torch's
            ``fuse_conv_bn_eval``), since a folded model should not be trained further (You et al.:
            training on folded weights changes the effective learning rate by ``a²``).
        adjacency: ``"fx"`` (trace the model, else its traceable submodules; errors if nothing
            traces), ``"sequential"`` (consecutive ``nn.Sequential`` children only) or ``"auto"``
            (fx, falling back to sequential).

    Returns:
        :class:`FoldReport` (``model, report = fold_norms(...)`` also works): the folded model, what
        was folded (norm, layer, side), and every norm that was not, with the reason.

    Each folded norm is replaced by ``nn.Identity`` (PowerNorm: its GroupScaling; BCN: the BCN with
    ``pbn = Identity``). Weights are computed in float64 and cast once to the layer's dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_norms expects an nn.Module, got {type(model).__name__}")
    bad_sides = [s for s in sides if s not in ("after", "before")] if not isinstance(sides, str) else [sides]
    if bad_sides or not sides:
        raise ValueError(f"fold_norms: sides must be a non-empty sequence of 'after'/'before', got {sides!r}")
    if adjacency not in ("auto", "fx", "sequential"):
        raise ValueError(f"fold_norms: adjacency must be 'auto', 'fx' or 'sequential', got {adjacency!r}")
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not _candidates(model):
        raise ValueError(f"fold_norms found no normalization layer in {type(model).__name__}")
    training = [n or "<root>" for n, m in _candidates(model).items() if m.training and _foldable(m)]
    if training:
        raise ValueError(
            f"fold_norms folds eval-mode norms, but {', '.join(training)} "
            f"{'is' if len(training) == 1 else 'are'} in training mode (batch statistics); call model.eval() first"
        )
    reference = _outputs(model, example_inputs) if example_inputs is not None else None
    target = model if inplace else copy.deepcopy(model)
    norms = _candidates(target)
    affines: dict[str, EvalAffine] = {}
    not_folded: dict[str, str] = {}
    for name, m in norms.items():
        try:
            affines[name] = eval_affine(m)
            verify_eval_affine(m, affines[name])
        except NotFoldableError as e:
            affines.pop(name, None)
            not_folded[name] = str(e)
    used = "fx"
    pairs: list[_Pair]
    if adjacency == "sequential":
        pairs, used = _sequential_pairs(target), "sequential"
    else:
        try:
            pairs, used = _traced_pairs(target, example_inputs)
        except Exception as e:  # noqa: BLE001  (any tracing failure: fall back, and say so)
            if adjacency == "fx":
                raise ValueError(f"fold_norms(adjacency='fx'): {e}") from e
            pairs, used = _sequential_pairs(target), "sequential"

    report = FoldReport(target, adjacency=used)
    tried: dict[str, list[str]] = {}
    done: set[str] = set()
    modules = dict(target.named_modules())
    aliased = aliased_modules(target)
    for side in sides:
        for p in pairs:
            if p.side != side or p.norm not in affines or p.norm in done:
                continue
            aff, layer = affines[p.norm], modules.get(p.layer)
            if layer is None:
                continue
            rank = p.norm_rank
            problem = p.blocked or aliased.get(id(layer)) or aliased.get(id(modules[p.norm]))
            problem = problem or _pair_problem(layer, aff, side, rank)
            if problem:
                if isinstance(layer, (*_CONVS, _CONV_T, nn.Linear)):
                    tried.setdefault(p.norm, []).append(f"{side} {p.layer}: {problem}")
                continue
            (_fold_after if side == "after" else _fold_before)(layer, aff)
            _set(target, p.norm, aff.remainder())
            note = ""
            if isinstance(layer, nn.Linear) and aff.layout == "channels_first" and rank is None:
                note = "assumes the norm sees (N, C) features (pass example_inputs to check)"
                warnings.warn(
                    f"fold_norms: folded {p.norm} {side} the Linear {p.layer} assuming it sees (N, C) features; on "
                    "(N, C, L) input its channels are not the Linear's features and the fold is wrong. Pass "
                    "example_inputs to check the shapes.",
                    stacklevel=2,
                )
            report.folded.append(Folded(p.norm, p.layer, side, note))
            done.add(p.norm)
    for name, m in norms.items():
        if name in done:
            continue
        reason = (not_folded.get(name) or "; ".join(tried.get(name, []))
                  or "no adjacent Conv/Linear (or its output has other users)")
        report.not_folded.append(NotFolded(name, type(m).__name__, reason))
    if reference is not None:
        folded = _outputs(target, example_inputs)
        diffs = [float((f.double() - r.double()).abs().max()) for f, r in zip(folded, reference) if f.numel()]
        report.max_abs_diff = max(diffs, default=0.0)
    return report


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    if holder is model and not attr:
        raise ValueError("fold_norms cannot fold the model's root module itself")
    old = getattr(holder, attr)
    if new is not old:
        new.train(old.training)
        setattr(holder, attr, new)
