"""Registry of normalization methods: name → class + metadata.

Modules register themselves with :func:`register_norm`; :func:`create_norm` builds one by
name with the feature/channel count as the first argument (timm's ``norm_layer(C)`` convention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import nn

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


_REGISTRY: dict[str, NormInfo] = {}
_ALIASES: dict[str, str] = {}
_ALIAS_CLASSES: dict[str, type[nn.Module]] = {}


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
) -> Callable[[T], T]:
    """Class decorator adding a norm to the registry.

    ``aliases`` map to the same class; ``alias_classes`` map an alias to its own class (e.g.
    ``batchnorm2d`` → a rank-checking subclass) while sharing this entry's metadata.
    """

    def deco(cls: T) -> T:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"norm {name!r} is already registered")
        extra = dict(alias_classes or {})
        names = (*aliases, *extra)
        _REGISTRY[name] = NormInfo(
            name, cls, family, paper, layout, batch_dependent, train_eval_differ, description, names
        )
        for a in names:
            _ALIASES[a] = name
        _ALIAS_CLASSES.update(extra)
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


def create_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the norm registered as ``name`` for ``num_features`` features/channels."""
    cls = _ALIAS_CLASSES.get(name.lower()) or _lookup(name).cls
    return cls(num_features, **kwargs)
