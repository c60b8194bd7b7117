"""Normalize-and-Project (NaP): a norm before every non-linearity, weights held at their initial norm.

Lyle, Zheng, Khetarpal, Martens, van Hasselt, Pascanu, Dabney, "Normalization and effective learning
rates in reinforcement learning", NeurIPS 2024, arXiv:2407.01800.

Why: a weight ``W`` feeding a normalization layer is scale-invariant (``f(cW) = f(W)`` for
``c > 0``), so its gradient is orthogonal to it and every step grows ``‖W‖``; the effective learning
rate of such a weight is ``η / ‖W‖²``, so it decays as the norm grows. In nonstationary
training that implicit decay removes plasticity. NaP makes the schedule explicit:

1. **Normalize** (:func:`normalize_and_project`): insert a normalization layer before each
   non-linearity that lacks one, so every pre-activation is normalized and the weights feeding it
   become scale-invariant.
2. **Project** (:class:`NaP`): after every optimizer step put each scale-invariant weight back on
   the sphere of its initial norm, ``W ← W · ‖W₀‖ / ‖W‖`` (per layer, Frobenius norm). The
   effective learning rate is then ``η / ‖W₀‖²`` at every step, and any decay is the learning-rate
   schedule's, in plain sight.
3. **The norms' own gain and offset** are not scale-invariant. Following the paper's treatment for
   homogeneous non-linearities such as ReLU (scaling a norm's gain and offset *together* by
   ``c > 0`` scales the activation by ``c``, which the next norm removes), the default
   ``affine="joint"`` projects
   the concatenation ``(γ, β)`` of each norm layer back to its initial norm,
   ``(γ, β) ← (γ, β) · ‖(γ₀, β₀)‖ / ‖(γ, β)‖``. ``affine="none"`` leaves them free.
   [Partly verified: the paper's Algorithm 1 could not be read from this machine; the joint
   projection is what the description and a third-party reimplementation (Plasticine) do. The
   switch exists so the other reading can be run.]

Deviations, each a switch:

* ``bias="joint"`` (default): a layer ``Wx + b`` feeding a norm is invariant to scaling ``(W, b)``
  together, not ``W`` alone, so the bias is projected with its weight as one vector. ``"none"``
  projects ``W`` alone (the literal ``W ← W‖W₀‖/‖W‖``; exact when the layer has no bias).
* Which layers get a norm: only activations that follow a ``Linear``/``Conv`` in an
  ``nn.Sequential`` (a functional ``F.relu`` inside ``forward`` is invisible to model surgery and
  is reported in ``skipped``). The inserted norm is :class:`normkit.nn.LayerNorm` after a linear
  layer and :class:`normkit.nn.GroupNorm` with one group (LayerNorm over C×H×W) after a
  convolution; ``norm=`` takes any ``(channels, layer) -> module`` factory instead.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from normkit.nn.replace import ReplaceReport, replace_modules

__all__ = ["NaP", "is_norm_layer", "nap_targets", "normalize_and_project"]

#: Non-linearities NaP puts a norm in front of (module classes).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish,
)  # fmt: skip
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
)  # fmt: skip

NormFactory = Callable[[int, nn.Module], nn.Module]


def is_norm_layer(m: nn.Module) -> bool:
    """Whether ``m`` normalizes its input (torch's norms, normkit's modules, which subclass them or are registered)."""
    if isinstance(m, _NORMS):
        return True
    from normkit.registry import list_norms, norm_info

    return any(isinstance(m, norm_info(n).cls) for n in list_norms())


def _default_norm(channels: int, layer: nn.Module) -> nn.Module:
    from normkit.nn import GroupNorm, LayerNorm

    if isinstance(layer, nn.Linear):
        return LayerNorm(channels)
    return GroupNorm(channels, num_groups=1)


def _channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def normalize_and_project(
    model: nn.Module,
    norm: NormFactory | None = None,
    *,
    activations: Sequence[type[nn.Module]] = ACTIVATIONS,
    inplace: bool = True,
) -> ReplaceReport:
    """Insert a normalization layer before every non-linearity that has none (NaP's "normalize").

    In each ``nn.Sequential`` of ``model``, an activation module whose predecessor is a
    ``Linear``/``Conv`` layer (not a norm) becomes ``nn.Sequential(norm(C, layer), activation)``,
    ``C`` the layer's output features/channels. Replacement goes through
    :func:`normkit.nn.replace.replace_modules` (device, dtype and train/eval mode follow the model).

    Returns the :class:`~normkit.nn.replace.ReplaceReport` (``.model`` is the converted model);
    ``report.skipped`` names the activation modules that were not given a norm: not preceded by a
    linear/conv layer in a ``Sequential`` (e.g. first in their block), or one module instance
    registered at several places, which would otherwise share one norm. Functional activations
    (``F.relu`` in ``forward``) are invisible to model surgery and not listed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"normalize_and_project expects an nn.Module, got {type(model).__name__}")
    acts = tuple(activations)
    if not acts or not all(isinstance(a, type) and issubclass(a, nn.Module) for a in acts):
        raise TypeError(f"activations must be nn.Module classes, got {activations!r}")
    factory = norm if norm is not None else _default_norm
    if not callable(factory):
        raise TypeError(f"norm must be a callable (channels, layer) -> nn.Module, got {type(norm).__name__}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    # id(activation) -> (channels, preceding layer); None when it cannot be given one norm
    plan: dict[int, tuple[int, nn.Module] | None] = {}
    normalized: set[int] = set()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.children())
        for i, m in enumerate(children):
            if not isinstance(m, acts):
                continue
            prev = children[i - 1] if i > 0 else None
            if prev is not None and is_norm_layer(prev):
                normalized.add(id(m))
                continue
            want = (_channels(prev), prev) if isinstance(prev, _WEIGHTED) else None
            have = plan.get(id(m), want)
            plan[id(m)] = want if want is not None and have is not None and have[0] == want[0] else None
    places: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, acts):
            places.setdefault(id(m), []).append(n)
    for k, where in places.items():
        if len(where) > 1:
            plan[k] = None  # one module at several places would get one shared norm
    skipped = sorted(n for k, where in places.items() if plan.get(k) is None and k not in normalized for n in where)

    def build(_: str, act: nn.Module) -> nn.Module:
        channels, layer = plan[id(act)]  # type: ignore[misc]
        return nn.Sequential(factory(channels, layer), act)

    report = replace_modules(model, lambda _, m: plan.get(id(m)) is not None, build)
    report.skipped = skipped  # type: ignore[attr-defined]
    return report


def nap_targets(model: nn.Module) -> tuple[list[list[nn.Parameter]], list[list[nn.Parameter]]]:
    """The parameter sets NaP projects: (weights feeding a norm, norm gain/offset pairs).

    A weight feeds a norm when its ``Linear``/``Conv`` layer is directly followed, in an
    ``nn.Sequential``, by a normalization layer or by a ``Sequential`` that starts with one
    (after :func:`normalize_and_project`, every layer before a non-linearity). Each set is a list
    of parameters projected as one vector: ``[weight]`` or ``[weight, bias]``; ``[gain, offset]``
    or ``[gain]`` for a norm layer.
    """
    weights: list[list[nn.Parameter]] = []
    seen: set[int] = set()

    def first_leaf(m: nn.Module) -> nn.Module:
        while isinstance(m, nn.Sequential) and len(m) > 0:
            m = m[0]
        return m

    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.children())
        for prev, nxt in zip(children, children[1:]):
            if isinstance(prev, _WEIGHTED) and is_norm_layer(first_leaf(nxt)) and id(prev) not in seen:
                seen.add(id(prev))
                weights.append([p for p in (prev.weight, prev.bias) if p is not None])
    norms = []
    for m in model.modules():
        if is_norm_layer(m):
            group = [p for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias") and p is not None]
            if group:
                norms.append(group)
    return weights, norms


def _joint_norm(ts: Iterable[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.detach().double().pow(2).sum() for t in ts), torch.zeros((), dtype=torch.float64)))


class NaP:
    """Optimizer wrapper: after each ``step()`` of ``optimizer``, project NaP's weights back to their initial norms.

    Args:
        optimizer: any torch optimizer over ``model``'s parameters (the paper uses Adam / SGD).
        model: the model (after :func:`normalize_and_project`); :func:`nap_targets` picks the
            weights feeding a norm and the norms' gain/offset. Give ``groups`` instead (or as well)
            to project other parameter sets, e.g. weights found by
            :func:`normkit.optim.scale_invariant_params`.
        groups: extra parameter sets, each projected as one vector (a tensor or a list of tensors).
        bias: ``"joint"`` (default) projects a layer's weight and bias together; ``"none"`` the
            weight alone (see the module doc).
        affine: ``"joint"`` (default) projects each norm's ``(γ, β)`` together; ``"none"`` leaves
            them free.

    The initial norms are read when the wrapper is built (build it before training) and saved in
    :meth:`state_dict`. ``param_groups`` and ``state`` are the wrapped optimizer's; give
    ``nap.optimizer`` to an ``lr_scheduler``, which requires a ``torch.optim.Optimizer``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        groups: Iterable[Tensor | Sequence[Tensor]] = (),
        bias: Literal["joint", "none"] = "joint",
        affine: Literal["joint", "none"] = "joint",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"NaP wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if bias not in ("joint", "none"):
            raise ValueError(f"bias must be 'joint' or 'none', got {bias!r}")
        if affine not in ("joint", "none"):
            raise ValueError(f"affine must be 'joint' or 'none', got {affine!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self._step_pre_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()  # weakref-able, as torch's
        self._step_post_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()
        self.bias, self.affine = bias, affine
        sets: list[list[Tensor]] = []
        if model is not None:
            weights, norms = nap_targets(model)
            sets += [ws if bias == "joint" else ws[:1] for ws in weights]
            if affine == "joint":
                sets += norms
        for g in groups:
            sets.append([g] if isinstance(g, Tensor) else list(g))
        if not sets:
            raise ValueError("NaP found nothing to project: the model has no weight feeding a norm and no groups were given")
        ids = [id(t) for s in sets for t in s]
        if len(ids) != len(set(ids)):
            raise ValueError("a parameter appears in two NaP projection sets")
        self.sets = sets
        self.init_norms = [float(_joint_norm(s)) for s in sets]
        for s, n in zip(sets, self.init_norms):
            if not math.isfinite(n) or n == 0.0:
                shapes = [tuple(t.shape) for t in s]
                raise ValueError(f"NaP needs a finite, nonzero initial norm; got {n} for parameters of shapes {shapes}")

    # -- the optimizer interface -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step, then :meth:`project` (hooks see the whole NaP step)."""
        for hook in list(self._step_pre_hooks.values()):
            hook(self, (), {})
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.project()
        for hook in list(self._step_post_hooks.values()):
            hook(self, (), {})
        return loss

    def register_step_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """``hook(nap, args, kwargs)`` before each step, as ``torch.optim.Optimizer``'s (e.g. for :class:`NormDiagnostics`)."""
        handle = RemovableHandle(self._step_pre_hooks)
        self._step_pre_hooks[handle.id] = hook
        return handle

    def register_step_post_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """``hook(nap, args, kwargs)`` after each step *and* its projection."""
        handle = RemovableHandle(self._step_post_hooks)
        self._step_post_hooks[handle.id] = hook
        return handle

    @torch.no_grad()
    def project(self) -> None:
        """``θ ← θ · ‖θ₀‖ / ‖θ‖`` for every projection set (a set with zero norm is left alone)."""
        for s, target in zip(self.sets, self.init_norms):
            norm = float(_joint_norm(s))
            if norm > 0.0 and math.isfinite(norm):
                for t in s:
                    t.mul_(target / norm)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "init_norms": list(self.init_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms = state.get("init_norms")
        if norms is None or len(norms) != len(self.sets):
            got = "none" if norms is None else len(norms)
            raise ValueError(f"NaP state has {got} initial norms, this wrapper projects {len(self.sets)} sets")
        self.optimizer.load_state_dict(state["optimizer"])
        self.init_norms = [float(n) for n in norms]

    def __repr__(self) -> str:
        return f"NaP({self.optimizer.__class__.__name__}, sets={len(self.sets)}, bias={self.bias!r}, affine={self.affine!r})"
