"""``normkit kernels``: time every registered norm against torch's native op in the same run.

For each norm at its layout's shape (tokens ``8192×1024`` for channels-last norms, images
``32×64×56×56`` for channels-first ones, fp32) it measures forward and forward+backward time
on the chosen backends (default ``auto``, ``eager`` and ``compiled``; the ``auto`` row names the
implementation ``"auto"`` picked in the ``runs`` column) and for torch's native equivalent, and reports:

* ``vs native`` — our fwd+bwd time / the native equivalent's (``F.rms_norm`` for rmsnorm, …);
* ``vs target`` — our fwd+bwd time / the reference op of the issue's target
  (``F.layer_norm`` for token norms, ``F.batch_norm`` for batchnorm, ``F.group_norm`` for the
  other image norms);
* ``x copy`` — fwd+bwd time relative to ``x.clone()`` (a memory-bandwidth yardstick);
* ``saved`` — bytes autograd keeps for backward, as a multiple of the input's size;
* ``compile s`` — first-call cost of the compiled backends (compile + first run; for
  ``compiled`` this includes building normkit's CPU kernels once per machine, cached on disk).

Times are medians over ``reps`` rounds after a warm-up; within a round every candidate (native,
eager, compiled, copy) runs once, in a shuffled order, so background noise and cache state affect
them alike, and each starts with its inputs freshly read (in cache).

Page faults: glibc serves allocations above 32 MiB (an 8192×1024 fp32 tensor is exactly that) by
``mmap`` and unmaps them on free, so every fresh output of that size is faulted in again — about
7 ms per tensor on the 2-core machine (per output or temporary of that size, whoever allocates it),
often more than the kernel itself. That is what a training loop on this machine pays, so it is the default.
``warm_alloc=True`` (``normkit kernels --warm-alloc``) calls :func:`warm_allocator` first, which
makes glibc keep freed memory for reuse, so the table shows kernel time alone.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from normkit.backend import record, set_backend
from normkit.registry import NormInfo, list_norms, norm_info, sample_inputs, sample_norm

TOKENS = (8192, 1024)
IMAGES = (32, 64, 56, 56)
QUICK_TOKENS = (256, 64)
QUICK_IMAGES = (4, 16, 8, 8)


@dataclass
class Row:
    norm: str
    shape: tuple[int, ...]
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    vs_native: float
    vs_target: float
    x_copy: float
    saved_x: float
    compile_s: float | None = None
    runs: str = ""  # for the auto row: the implementation "auto" chose (native, kernels, eager, ...)


def warm_allocator() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the OS (this process only).

    Sets ``M_MMAP_MAX = 0`` (no ``mmap``-backed chunks) and a 2 GiB ``M_TRIM_THRESHOLD``; both
    stay in effect until the process exits. Returns False where the C library has no ``mallopt``
    (not glibc). Meant for a benchmark process, not for library code.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _interleaved_ms(
    fns: dict[str, Callable[[], object]], reps: int, warm: Callable[[], object] | None = None
) -> dict[str, float]:
    """Median ms of each function, timed round-robin so machine noise hits all of them alike.

    ``warm`` runs (untimed) before every timed call: it reads the inputs so every candidate starts
    with them in cache, as in a model where the previous layer has just written them. Without it
    the order matters: a candidate timed right after one that streams hundreds of MB of
    temporaries (the eager backends) finds its input evicted and pays for it (measured: 5.4 vs
    3.0 ms for the same compiled LayerNorm2d forward). The order within a round is shuffled
    (seeded) for the same reason: which buffer the allocator hands back, and whether it is still
    in cache, depends on what ran just before (measured: 3.35 ms first, 2.64 ms second in a row).
    """
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)  # a fixed position in the round would favour or penalize one candidate
        for k in order:
            if warm is not None:
                warm()
            t = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _native(name: str, m: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """torch's own equivalent of the registered norm ``name`` (same parameters); None if torch has none."""
    p = dict(m.named_parameters())
    w, b = p.get("weight"), p.get("bias")
    if name == "layernorm":
        return lambda x: TF.layer_norm(x, m.normalized_shape, w, b, m.eps)
    if name == "rmsnorm":
        return lambda x: TF.rms_norm(x, m.normalized_shape, w, m.eps)
    if name == "layernorm2d":
        return lambda x: TF.layer_norm(x.permute(0, 2, 3, 1), m.normalized_shape, w, b, m.eps).permute(0, 3, 1, 2)
    if name == "rmsnorm2d":
        return lambda x: TF.rms_norm(x.permute(0, 2, 3, 1), m.normalized_shape, w, m.eps).permute(0, 3, 1, 2)
    if name == "batchnorm":
        return lambda x: TF.batch_norm(x, None, None, w, b, True, 0.1, m.eps)
    if name == "groupnorm":
        return lambda x: TF.group_norm(x, m.num_groups, w, b, m.eps)
    if name == "instancenorm":
        return lambda x: TF.instance_norm(x, weight=w, bias=b, eps=m.eps)
    if name == "scalenorm":
        return lambda x: x * (m.scale / x.norm(dim=-1, keepdim=True).clamp_min(m.eps))
    if name == "dyt":
        return lambda x: torch.tanh(m.alpha * x) * w + b
    return None


def _target(layout: str, name: str, shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    c = shape[-1] if layout == "channels_last" else shape[1]
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    if layout == "channels_last":
        return lambda x: TF.layer_norm(x, (c,), w, b)
    if name == "batchnorm":
        return lambda x: TF.batch_norm(x, None, None, w, b, True)
    return lambda x: TF.group_norm(x, math.gcd(32, c), w, b)  # 32 groups, fewer if C is small (--quick)


def _build(name: str, c: int) -> nn.Module:
    kwargs = {"affine": True} if name == "instancenorm" else {}
    return sample_norm(name, c, **kwargs)


def _bench_norm(info: NormInfo, quick: bool, reps: int, backends: tuple[str, ...]) -> list[Row]:
    tokens = info.layout == "channels_last"
    shape = (QUICK_TOKENS if quick else TOKENS) if tokens else (QUICK_IMAGES if quick else IMAGES)
    c = shape[-1] if tokens else shape[1]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    gx = torch.randn(shape)
    m = _build(info.name, c)
    extra = sample_inputs(info.name, x.detach())
    with torch.no_grad():
        g = torch.randn_like(m(x, **extra))  # output shape (differs from x for embedding modules)
    params = [p for p in m.parameters() if p.requires_grad]

    def with_backend(be: str | None, f: Callable[[], object]) -> Callable[[], object]:
        if be is None:
            return f

        def call() -> object:
            with set_backend(be):
                return f()

        return call

    def fwd(f: Callable[..., Tensor]) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return f(x, **extra)

        return call

    def fwdbwd(f: Callable[..., Tensor], ps: list[Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(f(x, **extra), [x, *ps], g, allow_unused=True)

    native, target = _native(info.name, m), _target(info.layout, info.name, shape)
    mine = [("torch", native)] if native is not None else []
    compile_s: dict[str, float] = {}
    for be in ("compiled", "inductor"):
        if be in backends:
            t = time.perf_counter()
            with_backend(be, fwdbwd(m, params))()
            with_backend(be, fwd(m))()
            compile_s[be] = time.perf_counter() - t
    cands: dict[str, Callable[[], object]] = {
        "copy": lambda: x.detach().clone(),
        "target": lambda: torch.autograd.grad(target(x), [x], gx),
    }
    if native is not None:
        cands["torch:fwd"], cands["torch:fb"] = fwd(native), fwdbwd(native, params)
    for be in backends:
        cands[f"{be}:fwd"] = with_backend(be, fwd(m))
        cands[f"{be}:fb"] = with_backend(be, fwdbwd(m, params))
    inputs = [x.detach(), gx, g, *params, *(v for v in extra.values() if isinstance(v, Tensor))]

    def warm() -> None:
        for t in inputs:
            t.sum()

    ms = _interleaved_ms(cands, reps, warm)
    runs = {}
    if "auto" in backends:
        with record() as calls:
            with_backend("auto", fwdbwd(m, params))()
        runs["auto"] = calls[-1][1] if calls else "eager"
    nbytes = x.numel() * x.element_size()
    rows = []
    for label, f in mine + [(be, m) for be in backends]:
        saved = _saved_bytes(with_backend(None if label == "torch" else label, lambda f=f: f(x, **extra))) / nbytes
        fb = ms[f"{label}:fb"]
        vs_native = fb / ms["torch:fb"] if native is not None else float("nan")
        rows.append(Row(
            info.name, shape, label, ms[f"{label}:fwd"], fb, vs_native, fb / ms["target"],
            fb / ms["copy"], saved, compile_s.get(label), runs.get(label, ""),
        ))
    return rows


def run(
    norms: list[str] | None = None,
    *,
    quick: bool = False,
    reps: int = 10,
    backends: tuple[str, ...] = ("auto", "eager", "compiled"),
    echo: Callable[[str], None] | None = print,
) -> list[Row]:
    """Run the kernel benchmark and return its rows (also printed through ``echo``)."""
    rows: list[Row] = []
    for name in norms or list_norms():
        for r in _bench_norm(norm_info(name), quick, reps, backends):
            rows.append(r)
            if echo:
                echo(format_row(r))
    return rows


HEADER = (
    f"{'norm':<18}{'shape':<16}{'impl':<9}{'fwd ms':>9}{'fwd+bwd ms':>12}{'vs native':>11}"
    f"{'vs target':>11}{'x copy':>8}{'saved':>8}{'compile s':>11}  runs"
)


def format_row(r: Row) -> str:
    shape = "x".join(map(str, r.shape))
    comp = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
    native = f"{r.vs_native:>10.2f}x" if r.vs_native == r.vs_native else f"{'-':>11}"
    return (
        f"{r.norm:<18}{shape:<16}{r.impl:<9}{r.fwd_ms:>9.2f}{r.fwdbwd_ms:>12.2f}{native}"
        f"{r.vs_target:>10.2f}x{r.x_copy:>7.1f}x{r.saved_x:>7.2f}x{comp:>11}  {r.runs}"
    ).rstrip()
