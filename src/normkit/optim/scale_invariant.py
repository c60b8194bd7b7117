"""Find the weights a normalization layer makes scale-invariant, by tracing one forward pass.

A weight ``W`` is *scale-invariant* when the model's output does not change if ``W`` is multiplied
by any ``c > 0`` (layer view) or each of its output rows by its own ``c_r > 0`` (channel view).
Such weights are what AdamP/SGDP's projection is for (Heo et al., ICLR 2021, arXiv 2006.08217);
the optimizers detect them on the fly with a cosine test, which this module replaces by a
structural answer the user can give them once (``projection="channel"`` / ``"layer"``).

**How (the rule).** One forward pass in training mode records, with forward hooks, the output of
every ``Conv{1,2,3}d`` / ``ConvTranspose*`` / ``Linear`` and the input of every normalization
module. From each norm's input, the autograd graph is walked backwards through ops that keep the
scaling (below) until it reaches a recorded conv/linear output. What the path allows:

* per-channel *affine-safe* ops (clone, dtype casts, max/avg/adaptive pooling) commute with a
  per-channel positive scale **and** a per-channel shift, so the producer's bias does not matter;
* *positively homogeneous* ops (ReLU, LeakyReLU, multiplication or division by a constant tensor
  such as a dropout mask) keep a positive scale but not a shift: the producer must have no bias;
* *layout* ops (view/reshape/flatten/permute/transpose/(un)squeeze/mean) keep a global scale but
  lose the channel axis: the answer becomes the layer view and the producer must have no bias.

Norms with per-channel centring over positions (``_BatchNorm``, ``_InstanceNorm`` and their
normkit subclasses) give the channel view (a per-channel bias is removed by the centring); the
others (``LayerNorm``, ``GroupNorm``, ``RMSNorm``, and normkit's subclasses) give the layer view
and need a bias-free producer. Norm classes that subclass none of these are recognised by name
(``*BatchNorm*``/``*InstanceNorm*`` → channel, ``*LayerNorm*``/``*GroupNorm*``/``*RMSNorm*`` → layer,
e.g. transformers' ``Qwen3RMSNorm`` on the per-head queries and keys); ``norm_types`` adds others.
Transposed convolutions (weight ``(in, out, ...)``) give the layer view (a bias is still allowed
before a per-channel norm, as for the channel view).

**Verification** (``verify=True``, default): each candidate is then checked numerically: the
forward is run again (training mode, same RNG seed, running statistics restored afterwards) with
the weight scaled (by per-row factors in [0.5, 2] for the channel view, by 2 for the layer view)
and every output tensor must agree to ``rtol``. This removes what the rule cannot see: a conv
output that also feeds a residual branch, a weight shared with another layer, a norm whose
statistics are not per-sample. Candidates that fail are dropped (channel falls back to layer
first). Cost: one forward per candidate.

**Limits.** Only normalization *modules* are seen (a norm applied as a function, e.g.
``F.layer_norm`` inside ``forward``, is not); only parameters with ``requires_grad``; invariance
is checked in training mode (in eval mode BatchNorm uses running statistics and is not
scale-invariant); norms' eps makes invariance approximate, hence the tolerance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from normkit.optim.projection import check_projection

#: norm module type → the view its normalization makes the producer's weight invariant in
_NORM_VIEWS: tuple[tuple[type, str], ...] = (
    (nn.modules.batchnorm._BatchNorm, "channel"),
    (nn.modules.instancenorm._InstanceNorm, "channel"),
    (nn.GroupNorm, "layer"),
    (nn.LayerNorm, "layer"),
    (nn.RMSNorm, "layer"),
)
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)

_AFFINE_SAFE = re.compile(r"^(Clone|ToCopy|Alias|MaxPool\w*|AvgPool\w*|AdaptiveAvgPool\w*|AdaptiveMaxPool\w*)Backward\d*$")
_HOMOGENEOUS = re.compile(r"^(Relu|LeakyRelu|Mul|Div)Backward\d*$")
_LAYOUT = re.compile(
    r"^(View|UnsafeView|ReshapeAlias|Permute|Transpose|T|Squeeze|Unsqueeze|Flatten|Expand|Mean)Backward\d*$"
)


def _classify(node: Any) -> tuple[str, Any] | None:
    """(category, the single upstream node) for a pass-through op; None stops the walk."""
    name = type(node).__name__
    inputs = [n for n, _ in node.next_functions if n is not None]
    if len(inputs) != 1:
        return None  # a binary op with two tensors that carry gradient: not a pure rescaling
    if _AFFINE_SAFE.match(name):
        return "affine", inputs[0]
    if _HOMOGENEOUS.match(name):
        return "homogeneous", inputs[0]
    if _LAYOUT.match(name):
        return "layout", inputs[0]
    return None


#: class-name fallback for norms that do not subclass torch's (transformers' ``LlamaRMSNorm``, ...)
_NAME_VIEWS = ((re.compile(r"(Batch|Instance)Norm"), "channel"), (re.compile(r"(Layer|Group|RMS)Norm"), "layer"))


def _norm_view(module: nn.Module, extra: Mapping[type, str]) -> str | None:
    for cls, view in list(extra.items()) + list(_NORM_VIEWS):
        if isinstance(module, cls):
            return view
    name = type(module).__name__
    for pattern, view in _NAME_VIEWS:
        if pattern.search(name):
            return view
    return None


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _trace_candidates(model: nn.Module, example_input: Any, extra: Mapping[type, str]) -> dict[nn.Parameter, str]:
    produced: dict[int, tuple[Any, nn.Module]] = {}  # id(grad_fn) -> (grad_fn kept alive, producer)
    norm_inputs: list[tuple[Any, str]] = []
    handles = []

    def after_producer(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced[id(output.grad_fn)] = (output.grad_fn, module)

    def before_norm(view: str):
        def hook(module: nn.Module, args: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].grad_fn is not None:
                norm_inputs.append((args[0].grad_fn, view))

        return hook

    for module in model.modules():
        view = _norm_view(module, extra)
        if view is not None:
            handles.append(module.register_forward_pre_hook(before_norm(view)))
        elif isinstance(module, _PRODUCERS) and isinstance(getattr(module, "weight", None), nn.Parameter):
            handles.append(module.register_forward_hook(after_producer))
    try:
        with torch.enable_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()

    found: dict[nn.Parameter, str] = {}
    for node, norm_view in norm_inputs:
        keeps_channel, bias_safe = True, True
        while node is not None and id(node) not in produced:
            step = _classify(node)
            if step is None:
                node = None
                break
            category, node = step
            if category == "layout":
                keeps_channel = bias_safe = False
            elif category == "homogeneous":
                bias_safe = False
        if node is None:
            continue
        producer = produced[id(node)][1]
        weight, bias = producer.weight, getattr(producer, "bias", None)
        transposed = bool(getattr(producer, "transposed", False))
        per_channel = norm_view == "channel" and keeps_channel  # the norm centres each producer channel
        # a transposed convolution's weight is (in, out, ...): its rows are not the output channels
        view = "channel" if per_channel and not transposed else "layer"
        if isinstance(bias, torch.Tensor) and not (per_channel and bias_safe):
            continue  # the bias survives the normalization: the weight alone is not scale-invariant
        if weight.requires_grad and weight.dim() >= 2:
            # the weaker view wins when two norms disagree (channel invariance implies layer invariance)
            found[weight] = "layer" if found.get(weight) == "layer" else view
    return found


def _outputs(model: nn.Module, example_input: Any, seed: int) -> list[torch.Tensor]:
    """Every output tensor of one training-mode forward with a fixed RNG seed (dropout masks repeat)."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return [t.detach().clone() for t in _tensors(_call(model, example_input))]


def _invariant(
    model: nn.Module, example_input: Any, reference: list[torch.Tensor], weight: nn.Parameter, view: str, rtol: float,
    seed: int,
) -> bool:
    saved = weight.detach().clone()
    if view == "channel":
        gen = torch.Generator().manual_seed(seed + 1)
        factors = torch.exp(torch.empty(weight.shape[0]).uniform_(-0.69, 0.69, generator=gen))
        factors = factors.to(weight.device, weight.dtype).view([-1] + [1] * (weight.dim() - 1))
    else:
        factors = torch.tensor(2.0, dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            weight.mul_(factors)
        scaled = _outputs(model, example_input, seed)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    if len(scaled) != len(reference):
        return False
    for a, b in zip(reference, scaled):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        if not torch.allclose(b, a, rtol=rtol, atol=rtol * max(scale, 1e-12)):
            return False
    return True


def find_scale_invariant(
    model: nn.Module,
    example_input: Any,
    *,
    verify: bool = True,
    rtol: float = 1e-3,
    norm_types: Mapping[type, str] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Names of the parameters a normalization layer makes scale-invariant → ``"channel"`` or ``"layer"``.

    Args:
        model: any ``nn.Module``; it is run in training mode (its modes and buffers are restored).
        example_input: one batch: a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping
            (``model(**x)``). BatchNorm needs more than one sample per channel.
        verify: check each candidate numerically (see the module docstring).
        rtol: relative tolerance of that check (norms' eps make invariance approximate).
        norm_types: extra norm module types → ``"channel"`` (per-channel centring over positions)
            or ``"layer"``, tried before the built-in table.
        seed: RNG seed of the verification forwards (dropout masks must match).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    extra = dict(norm_types or {})
    for cls, view in extra.items():
        if not isinstance(cls, type) or view not in ("channel", "layer"):
            raise ValueError(f"norm_types maps module types to 'channel' or 'layer', got {cls!r}: {view!r}")
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        model.train()
        candidates = _trace_candidates(model, example_input, extra)
        if verify and candidates:
            reference = _outputs(model, example_input, seed)
            checked: dict[nn.Parameter, str] = {}
            for weight, view in candidates.items():
                for attempt in (("channel", "layer") if view == "channel" else ("layer",)):
                    if _invariant(model, example_input, reference, weight, attempt, rtol, seed):
                        checked[weight] = attempt
                        break
            candidates = checked
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for m, training in modes.items():
            m.train(training)
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: view for p, view in candidates.items() if p in names}


def scale_invariant_params(model: nn.Module, example_input: Any, **kwargs: Any) -> list[nn.Parameter]:
    """The parameters :func:`find_scale_invariant` finds, in ``model.named_parameters()`` order."""
    found = find_scale_invariant(model, example_input, **kwargs)
    return [p for n, p in model.named_parameters() if n in found]


def scale_invariant_groups(
    model: nn.Module,
    example_input: Any,
    *,
    rest: str = "auto",
    find: Mapping[str, Any] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`~normkit.optim.AdamP` / :class:`~normkit.optim.SGDP`: the
    channel-invariant weights with ``projection="channel"``, the layer-invariant ones with
    ``projection="layer"``, everything else with ``projection=rest`` (default ``"auto"``, the
    official cosine test; ``"off"`` trusts the tracing alone); ``group_options`` go into
    every group and ``find`` is passed to :func:`find_scale_invariant`. Empty groups are left out."""
    check_projection(rest)
    if "projection" in group_options or "params" in group_options:
        raise ValueError("scale_invariant_groups sets each group's 'params' and 'projection' itself; use rest= for the others")
    found = find_scale_invariant(model, example_input, **dict(find or {}))
    groups: dict[str, list[nn.Parameter]] = {"channel": [], "layer": [], rest: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[found.get(name, rest)].append(p)
    return [{"params": ps, "projection": mode, **group_options} for mode, ps in groups.items() if ps]


