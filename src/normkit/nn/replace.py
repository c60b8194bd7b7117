"""One way to swap submodules of a model: :func:`replace_modules`.

Every converter in normkit (IBN-a/IBN-b, weight standardization, AdaB²N, the test-time adapters)
goes through it, so they agree on what "replace" means:

* the walk is ``named_modules`` order (pre-order, names as ``named_modules`` gives them) and
  includes the root, named ``""``;
* a replaced module's subtree is not entered, and a module returned by ``build`` is never
  visited, so a builder that wraps the old module (or returns a module of the matched type)
  cannot recurse;
* a module registered at several places is matched and built **once**; the new module is put at
  every place (sharing is kept) and each place is reported;
* the new module gets the replaced one's ``training`` flag and, where they differ, its device
  (read from the first parameter, else the first buffer, of each) and its floating parameter
  dtype (read from the first parameter of each; a module without parameters keeps its dtypes,
  so float32 statistics buffers a builder chose stay float32);
* ``build`` may return the module it was given, changed in place (e.g. a class swap): it keeps
  its parameters and hooks, and it is reported all the same; returning ``None`` leaves it alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ReplaceReport", "replace_modules"]

Match = Callable[[str, nn.Module], bool]
Build = Callable[[str, nn.Module], "nn.Module | None"]


class ReplaceReport(list):
    """The ``(name, old type, new type)`` of every place a module was replaced, in walk order.

    A plain list of tuples, plus ``model``: the model the replacements were made in (the copy when
    ``inplace=False``; the new module when the root itself was replaced).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _device(m: nn.Module) -> torch.device | None:
    t = next(m.parameters(), None)
    if t is None:
        t = next(m.buffers(), None)
    return None if t is None else t.device


def _param_dtype(m: nn.Module) -> torch.dtype | None:
    p = next(m.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else None


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` in ``old``'s train/eval mode, moved to its device and parameter dtype where they differ."""
    if new is not old:
        want, have = _device(old), _device(new)
        device = want if want is not None and have is not None and want != have else None
        want_dt, have_dt = _param_dtype(old), _param_dtype(new)
        dtype = want_dt if want_dt is not None and have_dt is not None and want_dt != have_dt else None
        if device is not None or dtype is not None:
            new = new.to(device=device, dtype=dtype)
        new.train(old.training)
    return new


def replace_modules(
    model: nn.Module,
    match: Match,
    build: Build,
    *,
    inplace: bool = True,
) -> ReplaceReport:
    """Replace every submodule of ``model`` that ``match`` accepts with ``build``'s result.

    Args:
        model: the model to convert. Its root (name ``""``) is offered to ``match`` too; when it
            is replaced, the new root is ``report.model``.
        match: ``(qualified_name, module) -> bool``, called once per distinct module in
            ``named_modules`` order (not for the descendants of a replaced module).
        build: ``(qualified_name, old_module) -> new module or None`` for each accepted module;
            ``None`` keeps the old module, whose subtree is then walked as if it had not matched.
        inplace: ``False`` deep-copies ``model`` first and converts the copy (``report.model``);
            the original is left untouched.

    Returns:
        :class:`ReplaceReport`, a list of ``(qualified_name, old_type, new_type)`` (a shared
        module once per place it is registered at) with the converted model as ``.model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_modules expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ReplaceReport(model)
    # id(old module) -> (old type, its replacement or None when kept); ids stay valid because
    # every old module is still referenced by the model or by ``done`` until the walk ends
    done: dict[int, tuple[type, nn.Module | None, nn.Module]] = {}
    created: set[int] = set()

    def decide(name: str, m: nn.Module) -> tuple[bool, nn.Module | None]:
        """(first visit, replacement); ``build`` and ``match`` run on the first visit only."""
        if id(m) in done:
            return False, done[id(m)][1]
        old_type = type(m)
        new = build(name, m) if match(name, m) else None
        if new is not None:
            new = _like(new, m)
            created.add(id(new))
        done[id(m)] = (old_type, new, m)
        return True, new

    def walk(parent: nn.Module, prefix: str) -> None:
        for key, child in list(parent._modules.items()):
            if child is None or (id(child) in created and id(child) not in done):
                continue  # empty slot, or a module this call built
            name = f"{prefix}.{key}" if prefix else key
            first, new = decide(name, child)
            if new is not None:
                old_type = done[id(child)][0]
                if new is not child:
                    setattr(parent, key, new)
                report.append((name, old_type, type(new)))
            elif first:
                walk(child, name)

    _, root = decide("", model)
    if root is not None:
        report.model = root
        report.append(("", done[id(model)][0], type(root)))
    else:
        walk(model, "")
    return report
