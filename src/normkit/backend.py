"""Kernel backend selection: one dispatch shared by every layer.

Backends:

* ``"eager"`` — plain PyTorch ops with a hand-written closed-form backward
  (``torch.autograd.Function`` saving only the input plus per-row statistics). No warm-up.
* ``"compiled"`` — the fastest compiled code for the same forward/backward math. On CPU the
  row-wise norms (LayerNorm, RMSNorm, their channels-first forms, GroupNorm, InstanceNorm, fused
  add + norm) and DyT run normkit's own C++ kernels (:mod:`normkit.kernels.cpu`: one pass per row,
  column sums inside the row loop), built once with the system compiler and cached on disk;
  everything else (BatchNorm, half dtypes, the zoo) is the ``"inductor"`` path.
* ``"inductor"`` — the same math compiled with ``torch.compile`` alone (Inductor generates fused,
  vectorized loops). Compiled functions are cached per configuration; the first call of each new
  configuration pays the compile (seconds on CPU — ``normkit kernels`` reports it).
* ``"triton"`` — GPU kernels for CUDA tensors. This is the slot that later Triton kernels plug
  into via :func:`register_triton_kernel`; selecting it where it cannot run raises ``RuntimeError``.
* ``"auto"`` (default) — Triton where a kernel is registered and the tensor is on CUDA, else
  eager. ``"auto"`` never starts a compile the user did not ask for.

Inside a ``torch.compile`` region every backend traces the kernels' math (in the spelling the
``"compiled"`` backend uses, e.g. fused statistics, DyT's exp-form tanh), so the user's compiler
fuses it with its neighbours (no graph break, no nested compile).

Selection: per layer (``backend=`` argument, ``None`` = follow the global setting) or globally
with :func:`set_backend`, which also works as a context manager::

    normkit.set_backend("compiled")          # from now on
    with normkit.set_backend("eager"):       # only inside the block
        ...
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable, Hashable
from typing import Any

import torch

BACKENDS = ("auto", "eager", "compiled", "inductor", "triton")

_state = threading.local()
_triton_kernels: dict[str, Callable[..., Any]] = {}


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The global backend name (default ``"auto"``)."""
    return getattr(_state, "backend", "auto")


class set_backend:  # noqa: N801 - used like a function, as torch.set_grad_enabled
    """Set the global backend; usable as a plain call or as a context manager."""

    def __init__(self, name: str) -> None:
        self.prev = get_backend()
        _state.backend = _check(name)

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        _state.backend = self.prev


def register_triton_kernel(op: str, fn: Callable[..., Any]) -> None:
    """Plug a Triton implementation of kernel ``op`` into the ``"triton"`` backend."""
    _triton_kernels[op] = fn


def resolve(backend: str | None, x: torch.Tensor, op: str) -> str:
    """Concrete backend (``"eager"``, ``"compiled"``, ``"inductor"`` or ``"triton"``) for one call of ``op``."""
    name = _check(backend) if backend is not None else get_backend()
    if torch.compiler.is_compiling():
        return "eager"
    if name == "auto":
        return "triton" if (x.is_cuda and op in _triton_kernels) else "eager"
    if name == "triton":
        if not x.is_cuda:
            raise RuntimeError(f"backend 'triton' needs CUDA tensors; got a tensor on {x.device}")
        if op not in _triton_kernels:
            raise RuntimeError(
                f"backend 'triton' has no kernel registered for {op!r} "
                f"(registered: {sorted(_triton_kernels) or 'none'}); use 'auto', 'eager' or 'compiled'"
            )
    return name


def triton_kernel(op: str) -> Callable[..., Any]:
    return _triton_kernels[op]


@functools.cache
def compiled(fn: Callable[..., Any], key: Hashable = None) -> Callable[..., Any]:
    """``torch.compile(fn)``, created once per ``(fn, key)``.

    Dynamo caches compiled graphs per *code object* and gives up after a few recompiles
    (``recompile_limit``). A model holds many norm configurations (axes, eps, affine, dtype),
    so each configuration ``key`` gets its own copy of the code object and its own budget;
    within one, shape changes fall back to one dynamic-shape graph after the first recompile.
    """
    if key is not None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{abs(hash(key)):x}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    graph = torch.compile(fn, fullgraph=True)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        # donated buffers would forbid backward(retain_graph=True) (gradcheck, double backward users)
        with torch._functorch.config.patch(donated_buffer=False):
            return graph(*args)

    return call


def executor(impl: str, fn: Callable[..., Any], key: Hashable) -> Callable[..., Any]:
    """The function that runs ``fn`` on backend ``impl``: compiled per ``key``, or ``fn`` itself (eager)."""
    return compiled(fn, key) if impl in ("compiled", "inductor") else fn
