"""Swap the normalization layers of any model for normkit's: :func:`replace_norms`.

Norms are found and mapped by :mod:`normkit.nn.recognize` (by behaviour: torch's norm classes and
third-party ``*RMSNorm``/``*LayerNorm`` modules such as transformers' Llama and Gemma RMSNorms), the
recognition every model-walking helper of normkit shares. Every exact mapping is checked numerically
when it is made (and third-party RMSNorms get the rounding order that reproduces them bit for bit in
bf16/fp16, ``RMSNorm(casting=...)``). A module no candidate reproduces is left in place and reported
as not converted, with the reason. Normkit's own modules are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from normkit.nn.recognize import (
    ATOL,
    RTOL,
    _check,
    _copy_matching,
    _like_old,
    _num_features,
    _sample_shape,
    exact_equivalent,
    recognise_norm,
)
from normkit.nn.replace import replace_modules
from normkit.registry import create_norm, list_norms, norm_info

__all__ = ["ATOL", "RTOL", "NormReplacement", "NormReport", "recognise_norm", "replace_norms"]

Where = Callable[[str, nn.Module], bool]


class NormReplacement(NamedTuple):
    """One recognised norm: where, what it was, what it became (``None``: left in place), and why."""

    name: str
    old: str
    new: str | None
    exact: bool
    note: str


class NormReport(list):
    """A list of :class:`NormReplacement`, in ``named_modules`` order, plus the converted ``model``.

    A module registered at several places is listed at each of them. ``converted`` and
    ``not_converted`` split the list; ``all_exact`` says whether every listed norm was replaced
    by an exact equivalent.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def converted(self) -> list[NormReplacement]:
        return [r for r in self if r.new is not None]

    @property
    def not_converted(self) -> list[NormReplacement]:
        return [r for r in self if r.new is None]

    @property
    def all_exact(self) -> bool:
        return all(r.exact for r in self)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} of {len(self)} norms replaced"]
        for r in self:
            status = "exact" if r.exact else ("not exact" if r.new else "kept")
            lines.append(f"  {r.name or '<root>'}: {r.old} -> {r.new or '-'} ({status}{': ' + r.note if r.note else ''})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- the verb


def _where(where: Where | type | tuple[type, ...] | None) -> Where:
    if where is None:
        return lambda name, m: True
    if isinstance(where, type) or (isinstance(where, tuple) and all(isinstance(c, type) for c in where)):
        return lambda name, m: isinstance(m, where)
    if callable(where):
        return where
    raise TypeError(f"where must be a callable (name, module) -> bool or a class/tuple of classes, got {where!r}")


def _check_target(to: str | None) -> None:
    if to is None:
        return
    if not isinstance(to, str):
        raise TypeError(f"to must be a registered norm name or None, got {type(to).__name__}")
    try:
        norm_info(to)
    except ValueError:
        raise ValueError(
            f"replace_norms: to={to!r} is not a registered norm; registered names: {', '.join(list_norms(aliases=True))}"
        ) from None


def replace_norms(
    model: nn.Module,
    to: str | None = None,
    *,
    where: Where | type | tuple[type, ...] | None = None,
    inplace: bool = True,
    **kwargs: Any,
) -> NormReport:
    """Replace the normalization layers of ``model`` (recursively) with normkit's.

    Args:
        model: any ``nn.Module``; its root is considered too.
        to: ``None`` (default) — the exact normkit equivalent of each norm (torch's ``LayerNorm`` →
            ``normkit.LayerNorm``, ``LlamaRMSNorm`` → ``normkit.RMSNorm``, ``GemmaRMSNorm`` →
            ``normkit.RMSNorm(weight_offset=1)``, ...); a module none reproduces is kept and
            reported. A registered name (:func:`normkit.list_norms`) builds that norm for every
            recognised layer with ``create_norm(to, num_features, **kwargs)``, copying the
            parameters and buffers whose name and shape match; ``exact`` then says whether the
            outputs still agree. Unknown names raise ``ValueError``.
        where: which recognised norms to replace: a ``(qualified_name, module) -> bool`` predicate
            or a class / tuple of classes (default: all).
        inplace: ``False`` converts a deep copy (``report.model``) and leaves ``model`` untouched.
        **kwargs: passed to the new modules' constructors (e.g. ``backend="compiled"``).

    The new modules keep the old ones' device, parameter dtype and train/eval mode, and the
    state-dict keys stay the same for exact replacements, so checkpoints load both ways.

    Returns:
        :class:`NormReport`: one :class:`NormReplacement` ``(name, old, new, exact, note)`` per
        recognised norm (``new=None`` where it was kept), with the converted model as ``.model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_norms expects an nn.Module, got {type(model).__name__}")
    _check_target(to)
    accept = _where(where)
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    # id(old module) -> (exact, note); refusals by name (a refused module is built once, reported once)
    outcome: dict[int, tuple[bool, str]] = {}
    refused: list[NormReplacement] = []

    def match(name: str, m: nn.Module) -> bool:
        return recognise_norm(m) is not None and bool(accept(name, m))

    def build(name: str, m: nn.Module) -> nn.Module | None:
        kind = recognise_norm(m)
        new, exact, note = _build(m, kind, to, kwargs)
        if new is None:
            refused.append(NormReplacement(name, type(m).__name__, None, False, note))
        else:
            outcome[id(new)] = (exact, note)
        return new

    done = replace_modules(model, match, build, inplace=inplace)
    report = NormReport(done.model)
    entries = list(refused)
    for name, old_type, _new_type in done:
        new_module = done.model.get_submodule(name) if name else done.model
        exact, note = outcome[id(new_module)]
        entries.append(NormReplacement(name, old_type.__name__, type(new_module).__name__, exact, note))
    report.extend(sorted(entries, key=lambda r: order.get(r.name, len(order))))
    return report


def _build(m: nn.Module, kind: str | None, to: str | None, kwargs: dict[str, Any]) -> tuple[nn.Module | None, bool, str]:
    """``(new module or None, exact, note)`` for one recognised norm."""
    shape = _sample_shape(m, kind)
    try:
        exact_new, exact_note = exact_equivalent(m, kind, **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"replace_norms: {e}") from e
    if to is None:
        if exact_new is None:
            return None, False, exact_note
        return exact_new, True, exact_note
    try:
        new = _like_old(create_norm(to, _num_features(m, kind), **kwargs), m)
    except Exception as e:  # noqa: BLE001
        return None, False, f"create_norm({to!r}) failed: {type(e).__name__}: {e}"
    if exact_new is not None and type(new) is type(exact_new):
        return exact_new, True, exact_note
    copied, kept = _copy_matching(m, new)
    ok, detail = _check(m, new, shape)
    copy_note = f"copied: {', '.join(copied) or 'nothing'}" + (f"; new init: {', '.join(kept)}" if kept else "")
    if ok:
        return new, True, f"checked: {detail}; {copy_note}"
    return new, False, f"{detail}; {copy_note}"
