"""Deprecation shims for renamed arguments: the old spelling keeps working, with a ``FutureWarning``.

One helper so every rename says the same thing and behaves the same way (old name converted,
both names at once an error). It depends on nothing in normkit, so any layer may use it.
"""

from __future__ import annotations

import warnings
from typing import Any

#: "argument not passed" (``None`` is a meaningful value for some renamed arguments)
MISSING: Any = object()


def renamed_argument(new_value: Any, old_value: Any, *, new: str, old: str, where: str, default: Any = MISSING) -> Any:
    """Value of an argument renamed from ``old`` to ``new``, taking either spelling.

    ``new_value`` / ``old_value`` are what the caller passed under each name (:data:`MISSING`
    when not passed). The old name gives a ``FutureWarning`` pointing at the caller's line
    (call this directly from the public function) and is converted; both names is a
    ``TypeError``; neither gives ``default`` (a ``TypeError`` if there is none: a required
    argument).
    """
    if old_value is MISSING:
        if new_value is MISSING:
            if default is MISSING:
                raise TypeError(f"{where} missing required argument {new!r}")
            return default
        return new_value
    if new_value is not MISSING:
        raise TypeError(f"{where} got both {new}={new_value!r} and its old name {old}={old_value!r}; pass {new} only")
    warnings.warn(
        f"{where}: {old}= is renamed to {new}= and the old name will be removed in a future release; pass {new}={old_value!r}",
        FutureWarning,
        stacklevel=3,
    )
    return old_value
