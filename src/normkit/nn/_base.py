"""Small helpers shared by the module shells."""

from __future__ import annotations

from normkit.backend import BACKENDS
from normkit.functional._core import check_eps


def check_module_args(eps: float | None, backend: str | None) -> None:
    if eps is not None:
        check_eps(eps)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def extra_options(**opts: object) -> str:
    """``extra_repr`` suffix listing normkit's options that differ from their defaults."""
    defaults = {"weight_offset": 0.0, "stats_dtype": None, "backend": None}
    parts = [f"{k}={v!r}" for k, v in opts.items() if v != defaults.get(k)]
    return (", " + ", ".join(parts)) if parts else ""
