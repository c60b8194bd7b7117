"""Kernel backend selection: one dispatch shared by every layer.

Backends a user can ask for (per layer with ``backend=``, or globally with :func:`set_backend`):

* ``"auto"`` (default) — the fastest correct implementation for each call, chosen by the table
  below (:data:`AUTO_RULES`). It never starts a ``torch.compile`` the user did not ask for; on CPU
  it may build normkit's C++ kernels on first use (about 1.5 s, once per machine, cached on disk,
  logged once on the ``normkit`` logger). Where no compiler works it uses ATen's op or the eager
  math instead, with one warning, and never fails.
* ``"native"`` — ATen's own op (``F.layer_norm``, ``F.group_norm``, …) wherever the layer's
  configuration is one torch computes exactly (no mask, no ``stats_dtype`` override, …); other
  configurations run the eager math.
* ``"eager"`` — normkit's math as plain PyTorch ops with a hand-written closed-form backward
  (``torch.autograd.Function`` saving only the input plus per-row statistics). No warm-up.
* ``"kernels"`` — normkit's C++ CPU kernels (:mod:`normkit.kernels.cpu`) where they apply, else the
  eager math; never compiles.
* ``"compiled"`` — normkit's C++ CPU kernels where they apply, else the same math through
  ``torch.compile`` (``"inductor"``).
* ``"inductor"`` — the math compiled with ``torch.compile`` alone (cached per configuration; the first
  call of each configuration pays the compile, seconds on CPU).
* ``"triton"`` — normkit's Triton kernels (:mod:`normkit.kernels.triton`, imported on first use;
  needs the ``triton`` package) or kernels plugged in with :func:`register_triton_kernel`, for CUDA
  tensors — and for CPU tensors while ``TRITON_INTERPRET=1`` is set (Triton's interpreter: slow,
  for tests). Selecting it where it cannot run raises ``RuntimeError``. ``"auto"`` does not choose
  normkit's Triton kernels yet (their GPU speed is unmeasured): an op's CUDA entry below flips to
  ``triton`` once ``scripts/gpu_check.sh`` shows it faster than ATen's op.

The ``"auto"`` table (op → preferred implementation per device; measured with ``normkit kernels``
on the 2-core CPU machine, fp32, against the native module):

================  ============  ============  =========  =========================================
op                CPU           CUDA          min_numel  why
================  ============  ============  =========  =========================================
layer_norm        native        native        -          ATen's fused op; normkit's kernel only ties it
rms_norm          kernels       native        32K        ATen's CPU RMSNorm is a chain of ops (5x slower)
layer_norm2d      kernels       native        16K        no ATen op: permute + F.layer_norm (3x slower)
rms_norm2d        kernels       native        16K        idem, permute + F.rms_norm
group_norm        kernels       native        1M         0.85-0.95x of F.group_norm, only at large sizes
instance_norm     kernels       native        32K        0.55-0.95x of F.instance_norm (it runs BN)
batch_norm        native        native        -          ATen's op; the kernels have no BN layout
add_norm          kernels       native        256K       sum and norm in one pass
dyt               kernels       eager         32K        one exp per element, sums inside the row loop
scale_norm        eager         eager         64K        closed-form backward, saves only the input;
                                                         without grad: the plain expression
normalize         kernels       eager         -          the generic engine the zoo layers use
(any other op)    eager         eager         -
================  ============  ============  =========  =========================================

``min_numel``: below it (input elements) the CPU uses ``native`` where exact — ATen's op, or for
DyT and ScaleNorm the plain torch expression — because a call into normkit's kernels costs ~40 µs
(forward) to ~100 µs (forward + backward) more Python than ATen's op on the 2-core machine, which
only the kernels' speed on larger inputs pays back (thresholds from ``normkit kernels --defaults``).

Fallbacks, in order: a Triton kernel registered for the op with ``auto=True`` (the default for
third-party kernels; normkit's own register with ``auto=False`` until measured) or a CUDA entry of
``triton`` with a registered kernel wins on CUDA; ``kernels`` needs a
float32/float64 contiguous CPU tensor and built kernels, else ``native`` where the
configuration is native-exact, else ``eager``; ``native`` on a configuration torch cannot compute
falls to ``kernels`` where they apply, else ``eager``. Other device types use ``native`` where
exact, else ``eager``.

Per-call cost: a module on the default backend does not call :func:`resolve` for small CPU inputs. It
computes once per configuration (:class:`normkit.nn._base.FastPath`, again when an option is assigned)
the size below which ``"auto"`` would pick ATen's op (:func:`native_below`) and then tests only the
input's device and size and :data:`thread_state` ``.plain`` (this thread runs ``"auto"`` with no
:class:`record` open) before calling ATen's op directly — no more Python calls per forward than torch's
own module (``tests/test_overhead.py``). The per-thread settings are class attributes of a
``threading.local`` subclass so that a thread that never set them reads defaults without a caught
``AttributeError`` (1.8 µs per call before).

Inside a user's ``torch.compile`` region, ``kernels`` and ``compiled`` run the C++ kernels as torch
operators (``torch.ops.normkit.*``, :mod:`normkit.kernels.ops`), so the compiled graph keeps them;
``native`` stays ATen's op (Inductor lowers it); ``eager`` and ``inductor`` trace the math, which
the user's compiler fuses with its neighbours (no graph break, no nested compile).

Selection: per layer (``backend=`` argument, ``None`` = follow the global setting) or globally
with :func:`set_backend`, which also works as a context manager::

    normkit.set_backend("compiled")          # from now on (this thread)
    with normkit.set_backend("eager"):       # only inside the block
        ...

The global setting is per thread (like ``torch.set_grad_enabled``): a data-loader or serving thread
does not see another thread's choice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import threading
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

_log = logging.getLogger("normkit")

BACKENDS = ("auto", "native", "eager", "kernels", "compiled", "inductor", "triton")


class _ThreadState(threading.local):
    """This thread's settings. The class attributes are what a thread that never set them reads: a
    missing attribute would make every ``getattr(_state, name, default)`` raise and catch an
    ``AttributeError`` inside (~1.8 µs per call measured, more than a small LayerNorm's own overhead)."""

    backend: str = "auto"
    record: list[tuple[str, str]] | None = None
    #: this thread runs ``"auto"`` with no :class:`record` open: the per-layer fast paths that the
    #: modules precompute with :func:`native_below` hold (one attribute read per call)
    plain: bool = True


_state = _ThreadState()
#: this thread's settings, for the modules' per-call fast-path test ``thread_state.plain`` (read only)
thread_state = _state
_triton_kernels: dict[str, Callable[..., Any]] = {}
# op -> the kernel registered with auto=False ("auto" leaves it to AUTO_RULES); a kernel put in its place
# otherwise (register_triton_kernel(op, fn), or a test's direct insertion) is picked by "auto" on CUDA
_triton_not_auto: dict[str, Callable[..., Any]] = {}
_TRITON_PACKAGE = "normkit.kernels.triton"  # normkit's kernels, imported on the first "triton" call


@dataclass(frozen=True)
class Rule:
    """``"auto"``'s choice for one op: preferred implementation on CPU and on CUDA.

    ``inference``: what to run when the caller says no gradient is needed (a closed-form autograd
    function pays off only with a backward: ScaleNorm's forward alone is 1.9x the plain expression).
    ``min_numel``: below this many input elements the CPU choice yields to ``native`` (when exact),
    because a call into normkit's kernels or autograd functions costs microseconds of Python more
    than ATen's op (or the plain torch code that stands for it), which matters only at small sizes.
    """

    cpu: str
    cuda: str
    min_numel: int = 0
    inference: str | None = None  # the choice when no gradient is needed (callers pass needs_grad)


AUTO_RULES: dict[str, Rule] = {
    "layer_norm": Rule(cpu="native", cuda="native"),
    "rms_norm": Rule(cpu="kernels", cuda="native", min_numel=1 << 15),
    "layer_norm2d": Rule(cpu="kernels", cuda="native", min_numel=1 << 14),
    "rms_norm2d": Rule(cpu="kernels", cuda="native", min_numel=1 << 14),
    "group_norm": Rule(cpu="kernels", cuda="native", min_numel=1 << 20),
    "instance_norm": Rule(cpu="kernels", cuda="native", min_numel=1 << 15),
    "batch_norm": Rule(cpu="native", cuda="native"),
    "add_norm": Rule(cpu="kernels", cuda="native", min_numel=1 << 18),
    "dyt": Rule(cpu="kernels", cuda="eager", min_numel=1 << 15),
    "scale_norm": Rule(cpu="eager", cuda="eager", min_numel=1 << 16, inference="native"),
    "normalize": Rule(cpu="kernels", cuda="eager"),
}
_EAGER = Rule(cpu="eager", cuda="eager")
_NATIVE_EVERYWHERE = frozenset(op for op, r in AUTO_RULES.items() if r.cpu == r.cuda == "native")
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _check(name: str) -> str:
    if name.__class__ is not str or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The global backend name of this thread (default ``"auto"``)."""
    return _state.backend


def _sync_plain() -> None:
    _state.plain = _state.backend == "auto" and _state.record is None


def thread_plain() -> bool:
    """Whether this thread runs the default backend with no :class:`record` open (then a layer may take
    the fast path it precomputed from :func:`native_below` instead of calling :func:`resolve`)."""
    return _state.plain


class set_backend:  # noqa: N801 - used like a function, as torch.set_grad_enabled
    """Set the global backend (this thread); usable as a plain call or as a context manager."""

    def __init__(self, name: str) -> None:
        self.prev = get_backend()
        _state.backend = _check(name)
        _sync_plain()

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        _state.backend = self.prev
        _sync_plain()


class record:  # noqa: N801 - used like a function, as set_backend
    """Collect the implementation each normkit call resolves to (this thread), for reports and tests::

        with normkit.backend.record() as calls:
            normkit.RMSNorm(64)(x)
        calls  # [("rms_norm", "kernels"), ("normalize", "kernels")]

    A layer may resolve twice (its own op, then the generic engine it calls).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __enter__(self) -> list[tuple[str, str]]:
        global _recording
        self.prev = _state.record
        _state.record = self.calls
        _sync_plain()
        _recording += 1
        return self.calls

    def __exit__(self, *exc: object) -> None:
        global _recording
        _state.record = self.prev
        _sync_plain()
        _recording -= 1


_recording = 0  # active record() blocks in any thread: resolve() skips the lookup when 0


def note(op: str, impl: str) -> None:
    """Add ``(op, impl)`` to an active :class:`record` (a kernel that fell back after resolution)."""
    rec = _state.record
    if rec is not None:
        rec.append((op, impl))


def register_triton_kernel(op: str, fn: Callable[..., Any], *, auto: bool = True) -> None:
    """Plug a Triton implementation of kernel ``op`` into the ``"triton"`` backend.

    ``auto=True``: ``"auto"`` also picks it for CUDA tensors. normkit's own kernels register with
    ``auto=False`` and are chosen by ``"auto"`` only where :data:`AUTO_RULES` says ``cuda="triton"``
    (set from a GPU measurement).
    """
    _triton_kernels[op] = fn
    if auto:
        _triton_not_auto.pop(op, None)
    else:
        _triton_not_auto[op] = fn


def triton_kernel(op: str) -> Callable[..., Any]:
    return _triton_kernels[op]


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now: the ``"triton"`` backend then also takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_triton_kernels() -> None:
    """Import normkit's Triton kernels (which register themselves) if ``triton`` is installed.

    A plug-in load by name, like the package root's lazy submodules: the kernels sit above this module.
    """
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module(_TRITON_PACKAGE)


# Set by normkit.kernels.cpu at import (the kernels sit above this module): whether normkit's C++
# CPU kernels are built and loaded (building them on first call).
_cpu_kernels_available: Callable[[], bool] = lambda: False  # noqa: E731


def register_cpu_kernels(available: Callable[[], bool]) -> None:
    global _cpu_kernels_available
    _cpu_kernels_available = available


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether normkit's C++ CPU kernels can take ``x`` (device, dtype, layout; built and loaded)."""
    return x.is_cpu and x.dtype in _KERNEL_DTYPES and x.is_contiguous() and _cpu_kernels_available()


def _auto(op: str, x: torch.Tensor, native_ok: bool, needs_grad: bool = True) -> str:
    if native_ok and op in _NATIVE_EVERYWHERE and (
        op not in _triton_kernels or _triton_not_auto.get(op) is _triton_kernels[op]
    ):
        return "native"  # the per-call fast path: no look at the tensor
    rule = AUTO_RULES.get(op, _EAGER)
    if not needs_grad and rule.inference is not None and (native_ok or rule.inference != "native"):
        return rule.inference
    # x.is_cpu / x.is_cuda, not x.device.type: building a device object costs ~1 µs per call
    if x.is_cpu:
        if native_ok and x.numel() < rule.min_numel:
            return "native"
        pref = rule.cpu
    elif x.is_cuda:
        if op in _triton_kernels and (rule.cuda == "triton" or _triton_not_auto.get(op) is not _triton_kernels[op]):
            return "triton"
        pref = "native" if rule.cuda == "triton" else rule.cuda
    else:
        pref = "native"
    if pref == "kernels":
        if kernels_apply(x):  # (checks the device too)
            return "kernels"
        pref = "native"
    if pref == "native":
        if native_ok:
            return "native"
        return "kernels" if rule.cpu != "eager" and kernels_apply(x) else "eager"
    return pref


#: "no bound": a native choice at every size
UNBOUNDED = 1 << 62

#: input elements from which ``"auto"`` runs the BatchNorm family's closed-form per-sample moments + affine
#: functions (:func:`normkit.functional.batch_variants.moments_fast_path` given the input) instead of the
#: layer's own path over ATen's ops. Below it the two autograd functions' Python and dispatch cost more
#: than they save: measured on the loaded 2-core machine (one thread, fwd+bwd, min of medians), the ATen
#: paths were 1.5–5× faster at 8×64×14×14 (100K elements) for Batch Renorm, Ghost BN, BCN and IBN, mixed
#: at 16×64×16×16 (262K: 0.5–2×), and the closed form 1.0–2.5× faster at the benchmark's 32×64×56×56
#: (6.4M). Used by Batch Renorm; Ghost BN keeps the closed form at every size (its per-chunk ATen path is
#: not overflow-checked there); the other layers' callers pass no input yet.
CLOSED_FORM_MIN_NUMEL = 1 << 18


def native_below(op: str, backend: str | None) -> int:
    """Input elements below which :func:`resolve` returns ``"native"`` for every CPU tensor, given a
    native-exact configuration (``native_ok``), the layer's ``backend`` (None: the thread's, while
    :func:`thread_plain`) and a gradient needed; 0 where no size gives that.

    A module computes this once per configuration (at construction, again when an option changes) and
    on each call tests ``x.is_cpu and x.numel() < bound and thread_state.plain`` instead of resolving:
    the per-call cost of the default backend then stays within a few attribute reads of torch's module.
    """
    if backend == "native":
        return UNBOUNDED
    if backend not in (None, "auto"):
        return 0
    rule = AUTO_RULES.get(op, _EAGER)
    if rule.cpu == "native":
        return UNBOUNDED
    return rule.min_numel


def resolve(backend: str | None, x: torch.Tensor, op: str, native_ok: bool = False, needs_grad: bool = True) -> str:
    """Concrete implementation for one call of ``op`` on ``x``.

    Returns ``"native"`` (only when ``native_ok``: the caller's configuration is one ATen's op
    computes exactly), ``"kernels"``, ``"eager"``, ``"compiled"``, ``"inductor"`` or ``"triton"``.
    ``needs_grad=False`` (the caller checked that no input requires grad) lets ``"auto"`` use an op's
    ``inference`` choice.
    """
    name = _state.backend if backend is None else _check(backend)
    impl = _auto(op, x, native_ok, needs_grad) if name == "auto" else _explicit(name, x, op, native_ok)
    if _recording:
        note(op, impl)
    return impl


def _explicit(name: str, x: torch.Tensor, op: str, native_ok: bool) -> str:
    """The implementation a backend the user named runs for ``op``."""
    if name == "native":
        return "native" if native_ok else "eager"
    if name == "triton":
        if not (x.is_cuda or (x.is_cpu and triton_interpreting())):
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got a tensor on {x.device}"
            )
        if op not in _triton_kernels:
            _load_triton_kernels()
        if op not in _triton_kernels:
            missing = "" if importlib.util.find_spec("triton") is not None else " (the triton package is not installed)"
            raise RuntimeError(
                f"backend 'triton' has no kernel registered for {op!r}{missing} "
                f"(registered: {sorted(_triton_kernels) or 'none'}); use 'auto', 'eager' or 'compiled'"
            )
        return name
    if torch.compiler.is_compiling():  # inside the user's compile: no nested compile
        return "kernels" if name == "compiled" else "eager" if name == "inductor" else name
    return name


@functools.cache
def compiled(fn: Callable[..., Any], key: Hashable = None) -> Callable[..., Any]:
    """``torch.compile(fn)``, created once per ``(fn, key)``.

    Dynamo caches compiled graphs per *code object* and gives up after a few recompiles
    (``recompile_limit``). A model holds many norm configurations (axes, eps, affine, dtype),
    so each configuration ``key`` gets its own copy of the code object and its own budget;
    within one, shape changes fall back to one dynamic-shape graph after the first recompile.

    Two things a long-running process must never see (issue 12, items 1 and 4):

    * **Recompile limit.** When a configuration still exhausts its budget (many shapes ×
      ``requires_grad`` patterns), Dynamo raises ``FailOnRecompileLimitHit`` under
      ``fullgraph=True``. The call then runs ``fn`` eagerly instead — the same math, the
      exception is raised before any of ``fn`` runs — and that configuration stays eager with
      one warning on the ``normkit`` logger.
    * **``backward(retain_graph=True)``.** Graphs are compiled with donated buffers off, but
      torch checks at *backward* time ``config.donated_buffer and bw_donated_idxs != []``,
      and a graph compiled with the flag off has ``bw_donated_idxs = None``, so retained
      backwards were refused ("compiled with non-empty donated buffers") for a graph that
      donates nothing. After each call the graph's metadata is set to the truth (``[]``);
      the global flag is never touched, so the user's own compiled models keep donating.
    """
    if key is not None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{abs(hash(key)):x}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    graph = torch.compile(fn, fullgraph=True)
    eager = False

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        nonlocal eager
        if eager:
            return fn(*args)
        try:
            # donated buffers would forbid backward(retain_graph=True) (gradcheck, double backward users)
            with torch._functorch.config.patch(donated_buffer=False):
                out = graph(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            eager = True
            _log.warning(
                "normkit: %s hit torch.compile's recompile limit; this configuration runs eagerly from now on",
                fn.__name__,
            )
            return fn(*args)
        _allow_retained_backward(out)
        return out

    return call


def _allow_retained_backward(out: Any) -> None:
    """Mark the compiled graphs behind ``out`` as donating no buffers (they were compiled so).

    torch leaves ``bw_donated_idxs = None`` on a graph compiled with ``donated_buffer=False``
    and then tests ``!= []`` at backward time; ``[]`` is the truth for these graphs. The
    metadata object is the one the backward closure reads (``CompiledFunction.metadata``).
    """
    for t in out if isinstance(out, (tuple, list)) else (out,):
        node = getattr(t, "grad_fn", None)
        meta = getattr(getattr(type(node), "_forward_cls", None), "metadata", None)
        if meta is not None and getattr(meta, "bw_donated_idxs", []) is None:
            meta.bw_donated_idxs = []


def executor(impl: str, fn: Callable[..., Any], key: Hashable) -> Callable[..., Any]:
    """The function that runs ``fn`` on backend ``impl``: compiled per ``key``, or ``fn`` itself (eager)."""
    return compiled(fn, key) if impl in ("compiled", "inductor") else fn
