"""Every public class and function of normkit's user-facing packages documents itself.

A class's docstring must be its first statement; a class attribute written above it turns the text into a
plain expression and leaves ``__doc__`` empty (LayerNorm and RMSNorm had lost theirs that way).
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ("normkit.nn", "normkit.functional", "normkit.optim", "normkit.distributed", "normkit.convert")


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_their_own_docstring(package):
    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    missing = []
    for name in names:
        obj = getattr(mod, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not obj.__module__.startswith("normkit"):
            continue
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if not (doc and doc.strip()):
            missing.append(name)
    assert not missing, f"{package}: public names without their own docstring: {missing}"
