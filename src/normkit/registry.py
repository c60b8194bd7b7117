"""Registry of normalization methods: name → class + metadata.

Modules register themselves with :func:`register_norm`; :func:`create_norm` builds one by
name with the feature/channel count as the first argument (timm's ``norm_layer(C)`` convention).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import Tensor, nn

Layout = Literal["channels_last", "channels_first"]
T = TypeVar("T", bound=type[nn.Module])


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str
    authors: str = ""

    def __str__(self) -> str:
        return f"{self.authors + ', ' if self.authors else ''}{self.title} ({self.year}), arXiv:{self.arxiv}"


@dataclass(frozen=True)
class NormInfo:
    """Metadata of one registered method."""

    name: str
    cls: type[nn.Module]
    family: str
    paper: Paper
    layout: Layout
    batch_dependent: bool
    train_eval_differ: bool
    description: str
    aliases: tuple[str, ...] = field(default=())
    #: ``True`` when ``m(x)`` returns a tensor shaped like ``x`` and the layer can replace a
    #: norm in any model (``norm_layer(C)``). Conditional norms (AdaIN, LOAN, RN-B) and
    #: embedding modules (Dual PatchNorm) are ``False``.
    drop_in: bool = True
    #: Names of the extra inputs ``forward`` requires besides ``x`` (e.g. ``("style",)``).
    extra_inputs: tuple[str, ...] = field(default=())
    #: ``C -> kwargs`` that make the layer valid for a small channel count (e.g. GroupNorm's
    #: ``num_groups``); used by the tests, ``normkit kernels`` and the bench.
    sample_kwargs: Callable[[int], dict[str, Any]] | None = None
    #: ``x -> {name: tensor}``: example values of :attr:`extra_inputs` for an input ``x``.
    sample_inputs: Callable[[Tensor], dict[str, Any]] | None = None


def _skip_empty_batches(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a batch-dependent norm's ``forward``: an input with no elements (N = 0, or zero-length
    sequences/spatial dims) in training mode runs the evaluation path instead, so the running
    statistics, counters and any other state stay untouched (as torch's BatchNorm leaves its
    statistics) and the output is empty, still connected to the parameters. Every submodule's
    ``training`` flag is restored afterwards. A layer synchronized over a ``process_group`` (itself
    or a submodule) runs its training path: it must join its group's collective, contributing zero
    samples, and updates its state with the global statistics as every other process does."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and isinstance(x, Tensor) and x.numel() == 0) or any(
            getattr(m, "process_group", None) is not None for m in self.modules()
        ):
            return forward(self, x, *args, **kwargs)
        flags = [(m, m.training) for m in self.modules()]
        self.train(False)
        try:
            return forward(self, x, *args, **kwargs)
        finally:
            for m, t in flags:
                m.training = t

    wrapper.__normkit_empty_guard__ = True  # type: ignore[attr-defined]
    return wrapper


def _no_torchscript(self: nn.Module) -> nn.Module:
    """``torch.jit.script`` calls this on every submodule first: one clear error instead of failures
    deep in TorchScript's frontend (TorchScript is deprecated upstream)."""
    raise RuntimeError(
        f"{type(self).__name__}: TorchScript (torch.jit.script) is not supported; use torch.compile or torch.export"
    )


_REGISTRY: dict[str, NormInfo] = {}
_ALIASES: dict[str, str] = {}
_ALIAS_CLASSES: dict[str, type[nn.Module]] = {}
_BY_CLASS: dict[type[nn.Module], NormInfo] = {}


def register_norm(
    name: str,
    *,
    family: str,
    paper: Paper,
    layout: Layout,
    batch_dependent: bool,
    train_eval_differ: bool,
    description: str,
    aliases: tuple[str, ...] = (),
    alias_classes: dict[str, type[nn.Module]] | None = None,
    drop_in: bool = True,
    extra_inputs: tuple[str, ...] = (),
    sample_kwargs: Callable[[int], dict[str, Any]] | None = None,
    sample_inputs: Callable[[Tensor], dict[str, Any]] | None = None,
) -> Callable[[T], T]:
    """Class decorator adding a norm to the registry.

    ``aliases`` map to the same class; ``alias_classes`` map an alias to its own class (e.g.
    ``batchnorm2d`` → a rank-checking subclass) while sharing this entry's metadata.
    ``drop_in``, ``extra_inputs``, ``sample_kwargs`` and ``sample_inputs`` are described on
    :class:`NormInfo`; a method with ``extra_inputs`` must give ``sample_inputs``.
    """
    if extra_inputs and sample_inputs is None:
        raise ValueError(f"norm {name!r} declares extra_inputs {extra_inputs} but no sample_inputs")
    if extra_inputs and drop_in:
        raise ValueError(f"norm {name!r} requires inputs {extra_inputs} besides x, so it cannot be drop_in=True")

    def deco(cls: T) -> T:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"norm {name!r} is already registered")
        extra = dict(alias_classes or {})
        names = (*aliases, *extra)
        _REGISTRY[name] = NormInfo(
            name, cls, family, paper, layout, batch_dependent, train_eval_differ, description, names,
            drop_in, tuple(extra_inputs), sample_kwargs, sample_inputs,
        )
        for a in names:
            _ALIASES[a] = name
        _ALIAS_CLASSES.update(extra)
        if "__prepare_scriptable__" not in vars(cls):
            cls.__prepare_scriptable__ = _no_torchscript  # type: ignore[attr-defined]
        if batch_dependent and not getattr(cls.forward, "__normkit_empty_guard__", False):
            cls.forward = _skip_empty_batches(cls.forward)  # type: ignore[method-assign]
        for c in (cls, *extra.values()):
            _BY_CLASS.setdefault(c, _REGISTRY[name])
        return cls

    return deco


def _lookup(name: str) -> NormInfo:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(list_norms(aliases=True))}")
    return _REGISTRY[key]


def list_norms(*, aliases: bool = False) -> list[str]:
    """Registered method names (sorted); with ``aliases=True`` also the alternative names."""
    names = set(_REGISTRY)
    if aliases:
        names |= set(_ALIASES)
    return sorted(names)


def norm_info(name: str) -> NormInfo:
    """Metadata of a registered method (name or alias)."""
    return _lookup(name)


def norm_info_of(module: nn.Module | type[nn.Module]) -> NormInfo | None:
    """Metadata of the registered method a module (or class) is, via its nearest registered base class.

    ``None`` for modules that are no registered norm (e.g. ``torch.nn.Conv2d``; torch's own norm
    classes are not registered, normkit's subclasses of them are).
    """
    cls = module if isinstance(module, type) else type(module)
    return next((_BY_CLASS[c] for c in cls.__mro__ if c in _BY_CLASS), None)


def create_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the norm registered as ``name`` for ``num_features`` features/channels."""
    cls = _ALIAS_CLASSES.get(name.lower()) or _lookup(name).cls
    return cls(num_features, **kwargs)


def sample_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """``create_norm`` with the method's :attr:`NormInfo.sample_kwargs` (overridden by ``kwargs``).

    Builds a valid layer for any small channel count, e.g. ``sample_norm("groupnorm", 8)``
    picks ``num_groups=8`` where the default of 32 would not divide 8.
    """
    info = _lookup(name)
    base = info.sample_kwargs(num_features) if info.sample_kwargs else {}
    return create_norm(name, num_features, **{**base, **kwargs})


def sample_inputs(name: str, x: Tensor) -> dict[str, Any]:
    """Example values for the extra ``forward`` inputs of ``name`` given input ``x`` (``{}`` if none)."""
    info = _lookup(name)
    return info.sample_inputs(x) if info.sample_inputs else {}
