"""``normkit kernels``: time every registered norm against torch's native op in the same run.

For each norm at its layout's shape (tokens ``8192×1024`` for channels-last norms, images
``32×64×56×56`` for channels-first ones, fp32) it measures forward and forward+backward time
on the chosen backends (default ``auto``, ``eager`` and ``compiled``; the ``auto`` row names the
implementation ``"auto"`` picked in the ``runs`` column) and for torch's native equivalent, and reports:

* ``vs native`` — our fwd+bwd time / the native equivalent's (``F.rms_norm`` for rmsnorm, …);
* ``vs target`` — our fwd+bwd time / the reference op of the issue's target
  (``F.layer_norm`` for token norms, ``F.batch_norm`` for batchnorm, ``F.group_norm`` for the
  other image norms; a layer whose cost is mostly its own non-norm ops is timed against its plain
  torch expression: DualPatchNorm's LN → Linear → LN, LOAN's BN + two 3×3 convs with their weight
  gradients);
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
    if name == "loan":  # BN, then the paper's two k×k convs of ReLU(BN(cond)) as scale/shift: its plain torch expression
        return lambda x, cond: _plain_loan(x, cond, m.mlp_gamma, m.mlp_beta, m.eps)
    if name == "dualpatchnorm":  # a patch embedding: the plain LN → Linear → LN with the layer's own parameters
        from normkit.nn.patch_norm import patchify

        return lambda x: TF.layer_norm(
            m.proj(TF.layer_norm(patchify(x, m.patch_size), m.ln0.normalized_shape, m.ln0.weight, m.ln0.bias, m.ln0.eps)),
            m.ln1.normalized_shape, m.ln1.weight, m.ln1.bias, m.ln1.eps,
        )
    return None


def _plain_loan(x: Tensor, cond: Tensor, conv_g: nn.Conv2d, conv_b: nn.Conv2d, eps: float) -> Tensor:
    """LOAN as plain torch ops (BatchNorm without affine, ReLU, two convs, modulation), batch statistics."""
    a = TF.relu(TF.batch_norm(cond, None, None, training=True, eps=eps))
    return TF.batch_norm(x, None, None, training=True, eps=eps) * (1 + conv_g(a)) + conv_b(a)


def _target(layout: str, name: str, shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """The reference op of ``vs target``; one with a ``params`` attribute is timed with those gradients too."""
    c = shape[-1] if layout == "channels_last" else shape[1]
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    if layout == "channels_last":
        return lambda x: TF.layer_norm(x, (c,), w, b)
    if name == "batchnorm":
        return lambda x: TF.batch_norm(x, None, None, w, b, True)
    if name == "dualpatchnorm":  # a patch embedding, not a norm of x: its plain torch expression (patch 1, D = C)
        lin = nn.Linear(c, c)
        return lambda x: TF.layer_norm(
            lin(TF.layer_norm(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, c), (c,), w, b, 1e-6)), (c,), w, b, 1e-6
        ).reshape(x.shape)
    if name == "loan":  # a norm plus the paper's two 3×3 convs (C → C): its plain expression, conv weight grads included
        convs = [nn.Conv2d(c, c, 3, padding=1) for _ in range(2)]
        cond = torch.randn(shape)

        def loan(x: Tensor) -> Tensor:
            return _plain_loan(x, cond, *convs, 1e-5)

        loan.params = [p for conv in convs for p in conv.parameters()]  # type: ignore[attr-defined]
        return loan
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
        "target": lambda: torch.autograd.grad(target(x), [x, *getattr(target, "params", ())], gx),
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


# ---------------------------------------------------------------- per-call overhead at µs scale (issue 11)


@dataclass
class OverheadRow:
    norm: str
    shape: tuple[int, ...]
    mode: str
    torch_us: float
    normkit_us: float

    @property
    def ratio(self) -> float:
        return self.normkit_us / self.torch_us


def min_of_medians_us(
    fns: dict[str, Callable[[], object]], rounds: int = 40, block_s: float = 3e-4, group: int = 5
) -> dict[str, float]:
    """µs per call of each function, robust to a loaded machine: calls are timed in blocks of the same
    count for every function (each block lasting about ``block_s``), the functions alternate ABBA so
    drift hits all alike, and the result is the smallest median over consecutive groups of ``group``
    blocks — a median rejects one-off stalls inside a group, the minimum over groups the periods when
    another process held the core (a plain median of 15 rounds swung 2–5× there on the 2-core machine).
    """
    count = {}
    for k, f in fns.items():
        for _ in range(3):
            f()
        t = time.perf_counter()
        for _ in range(3):
            f()
        count[k] = max(1, min(2000, int(block_s / max((time.perf_counter() - t) / 3, 1e-7))))
    n = min(count.values())
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            f = fns[k]
            t = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t) / n * 1e6)
    return {
        k: min(statistics.median(v[i:i + group]) for i in range(0, max(len(v) - group, 0) + 1, group))
        for k, v in samples.items()
    }


def _one_call(m: nn.Module, mode: str, x: Tensor, g: Tensor) -> Callable[[], object]:
    """One call of ``m`` as timed: forward + backward (``train``), else a forward under ``no_grad``."""
    if mode == "train":
        ps = [p for p in m.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(m(x), [x, *ps], g)

    def call() -> object:
        with torch.no_grad():
            return m(x)

    return call


def run_overhead(
    norms: list[str] | None = None, *, rounds: int = 40, small_only: bool = True,
    echo: Callable[[str], None] | None = print,
) -> list[OverheadRow]:
    """``normkit kernels --defaults``'s cases (:mod:`normkit.bench.defaults`) timed by :func:`min_of_medians_us`:
    µs per call of torch's module and normkit's, same run, interleaved. ``small_only``: the small shapes,
    where the Python cost of a call shows. Meant for ``OMP_NUM_THREADS=1`` on a shared machine (with more
    threads a small op's parallel region waits for a descheduled worker: milliseconds of noise per call)."""
    from normkit.bench import defaults

    rows = []
    for case in defaults.CASES:
        if norms and case.norm not in norms:
            continue
        for shape in case.shapes:
            if small_only and shape in (defaults.TOKENS, defaults.IMAGES):
                continue
            c = shape[-1] if case.shapes is defaults.TOKEN_SHAPES else shape[1]
            torch.manual_seed(0)
            ref, ours = case.torch_module(c), case.normkit_module(c)
            ours.load_state_dict(ref.state_dict(), strict=False)  # the same parameters where names match
            x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)
            for mode in case.modes:
                for m in (ref, ours):
                    m.train(mode != "eval")
                fns = {"torch": _one_call(ref, mode, x, g), "normkit": _one_call(ours, mode, x, g)}
                us = min_of_medians_us(fns, rounds)
                row = OverheadRow(case.norm, shape, mode, us["torch"], us["normkit"])
                rows.append(row)
                if echo:
                    echo(f"{row.norm:<15}{'x'.join(map(str, shape)):<15}{mode:<7}{row.torch_us:>10.1f}"
                         f"{row.normkit_us:>12.1f}{row.ratio:>7.2f}x")
    return rows


OVERHEAD_HEADER = f"{'norm':<15}{'shape':<15}{'mode':<7}{'torch us':>10}{'normkit us':>12}{'ratio':>8}"


# ---------------------------------------------------------------- GPU: normkit kernels --device cuda

#: widths of the GPU table (the issue's 256…32768) and the bytes of x per measurement
GPU_WIDTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
GPU_BYTES = 1 << 27  # 128 MiB of bf16/fp32 input per row of the table: well past the 60 MB L2 of an H100/H200
#: channels-first shapes: a ConvNeXt stage (LayerNorm2d), a UNet block (GroupNorm, 32 groups)
GPU_IMAGE_SHAPES = {"layernorm2d": (32, 192, 56, 56), "rmsnorm2d": (32, 192, 56, 56), "groupnorm": (8, 320, 64, 64)}


@dataclass
class GpuRow:
    op: str
    dtype: str
    shape: tuple[int, ...]
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    fwd_gbs: float  # bytes moved / time: forward reads x, writes y (add+norm: reads x, r, writes y, s)
    fwdbwd_gbs: float  # + backward: reads x, ∂y, writes ∂x
    of_copy: float  # fwd+bwd GB/s as a fraction of the measured copy's
    max_err: float  # |y − torch's y|, max


def _gpu_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median ms of a call: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) on CUDA;
    a wall-clock median elsewhere (the interpreter smoke test)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda f: do_bench(f, warmup=25, rep=100, return_mode="median")

    def wall(f: Callable[[], object]) -> float:
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    return wall


def _liger(op: str, w: Tensor, b: Tensor) -> Callable[..., Tensor] | None:
    """Liger-Kernel's module for ``op`` with the same parameters, if the package is importable (installed
    on the GPU machine for the comparison only); its RMSNorm without the in-place backward that would
    overwrite the shared ∂y."""
    try:
        if op == "rmsnorm":
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            try:
                m = LigerRMSNorm(w.numel(), eps=1e-6, in_place=False)
            except TypeError:
                m = LigerRMSNorm(w.numel(), eps=1e-6)
        elif op == "layernorm":
            from liger_kernel.transformers.layer_norm import LigerLayerNorm

            m = LigerLayerNorm(w.numel(), eps=1e-5, bias=True)
        else:
            return None
    except Exception:  # noqa: BLE001 - not installed, or an API change: the column stays empty
        return None
    m = m.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(b)
    return m


def _gpu_candidates(op: str, x: Tensor, r: Tensor, w: Tensor, b: Tensor) -> dict[str, Callable[[], Tensor]]:
    """``{impl: forward}`` for one op: torch's way, normkit's Triton kernels, Liger's (if importable)."""
    import normkit.functional as NF

    c = x.shape[-1] if op in ("layernorm", "rmsnorm", "add_rmsnorm") else x.shape[1]
    if op == "layernorm":
        cands = {"torch": lambda: TF.layer_norm(x, (c,), w, b, 1e-5),
                 "triton": lambda: NF.layer_norm(x, c, w, b, 1e-5, backend="triton")}
    elif op == "rmsnorm":
        cands = {"torch": lambda: TF.rms_norm(x, (c,), w, 1e-6),
                 "triton": lambda: NF.rms_norm(x, c, w, 1e-6, backend="triton")}
    elif op == "add_rmsnorm":  # both return (norm(x + r), x + r); the sum's gradient flows too
        cands = {"torch": lambda: _pair(TF.rms_norm(x + r, (c,), w, 1e-6), x + r),
                 "triton": lambda: _pair(*NF.add_norm(x, r, c, w, None, 1e-6, norm="rmsnorm", backend="triton"))}
    elif op in ("layernorm2d", "rmsnorm2d"):
        center = op == "layernorm2d"

        def permuted() -> Tensor:  # timm's LayerNorm2d: permute, F.layer_norm, permute back
            xt = x.permute(0, 2, 3, 1)
            y = TF.layer_norm(xt, (c,), w, b, 1e-6) if center else TF.rms_norm(xt, (c,), w, 1e-6)
            return y.permute(0, 3, 1, 2)

        fn = NF.layer_norm2d if center else NF.rms_norm2d
        cands = {"torch": permuted,
                 "triton": (lambda: fn(x, w, b, 1e-6, backend="triton")) if center
                 else (lambda: fn(x, w, 1e-6, backend="triton"))}
    else:  # groupnorm
        cands = {"torch": lambda: TF.group_norm(x, 32, w, b, 1e-5),
                 "triton": lambda: NF.group_norm(x, 32, w, b, 1e-5, backend="triton")}
    liger = _liger(op, w, b)
    if liger is not None:
        cands["liger"] = lambda: liger(x)
    return cands


def _pair(y: Tensor, s: Tensor) -> Tensor:
    return y + s  # one output to differentiate; the addition is the same for every candidate


def run_device(
    device: str = "cuda",
    *,
    ops: tuple[str, ...] = ("layernorm", "rmsnorm", "add_rmsnorm", "layernorm2d", "rmsnorm2d", "groupnorm"),
    widths: tuple[int, ...] = GPU_WIDTHS,
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    nbytes: int = GPU_BYTES,
    echo: Callable[[str], None] | None = print,
) -> list[GpuRow]:
    """``normkit kernels --device cuda``: forward and forward+backward time and achieved GB/s of torch's
    op, normkit's Triton kernels and Liger-Kernel's (where importable), in one run.

    GB/s counts the bytes a kernel must move (forward: read x, write y; forward+backward: those plus
    read x and ∂y, write ∂x; add+norm also reads r and writes the sum), divided by the median time;
    ``of copy`` relates it to a measured ``x.clone()`` of the same tensor (read + write). Per-row
    statistics and parameters are left out (under 1% at these sizes). ``device="interpret"`` runs the
    same table on CPU tensors under ``TRITON_INTERPRET=1`` with tiny sizes (a smoke test of the code,
    not a measurement).
    """
    timer = _gpu_timer(device)
    rows: list[GpuRow] = []
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    for dname in dtypes:
        dtype = dts[dname]
        for op in ops:
            image = op in GPU_IMAGE_SHAPES
            shapes = [GPU_IMAGE_SHAPES[op]] if image else [(max(1, nbytes // (wd * dtype.itemsize)), wd) for wd in widths]
            if device != "cuda":  # interpreter smoke test: a few rows
                shapes = [(2, 32, 3, 3)] if image else [(4, wd) for wd in widths]
            for shape in shapes:
                rows += _gpu_rows(op, dname, dtype, shape, "cpu" if device == "interpret" else device, timer, echo)
    return rows


def _gpu_rows(
    op: str, dname: str, dtype: torch.dtype, shape: tuple[int, ...], device: str,
    timer: Callable[[Callable[[], object]], float], echo: Callable[[str], None] | None,
) -> list[GpuRow]:
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    c = shape[-1] if len(shape) == 2 else shape[1]
    w = (1 + 0.1 * torch.randn(c, device=device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(c, device=device, dtype=dtype)).requires_grad_()
    cands = _gpu_candidates(op, x, r, w, b)
    with torch.no_grad():
        ref = cands["torch"]().float()
        g = torch.randn_like(ref).to(dtype)
    copy_ms = timer(lambda: x.detach().clone())
    moved_io = 2 if op != "add_rmsnorm" else 4  # forward: x → y (add+norm: x, r → y, s)
    elem = x.numel() * x.element_size()
    copy_gbs = 2 * elem / copy_ms / 1e6
    params = [x, r, w, b]
    out = []
    for impl, f in cands.items():
        with torch.no_grad():
            err = (f().float() - ref).abs().max().item()
            fwd = timer(f)
        fb = timer(lambda f=f: torch.autograd.grad(f(), params, g, allow_unused=True))
        fwd_gbs = moved_io * elem / fwd / 1e6
        fb_gbs = (moved_io + 3) * elem / fb / 1e6
        row = GpuRow(op, dname, shape, impl, fwd, fb, fwd_gbs, fb_gbs, fb_gbs / copy_gbs, err)
        out.append(row)
        if echo:
            echo(format_gpu_row(row))
    return out


GPU_HEADER = (
    f"{'op':<13}{'dtype':<6}{'shape':<18}{'impl':<8}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd GB/s':>10}"
    f"{'f+b GB/s':>10}{'of copy':>9}{'max err':>10}"
)


def format_gpu_row(r: GpuRow) -> str:
    shape = "x".join(map(str, r.shape))
    return (
        f"{r.op:<13}{r.dtype:<6}{shape:<18}{r.impl:<8}{r.fwd_ms:>9.3f}{r.fwdbwd_ms:>12.3f}{r.fwd_gbs:>10.0f}"
        f"{r.fwdbwd_gbs:>10.0f}{r.of_copy:>8.0%}{r.max_err:>10.1e}"
    )


def device_cli(args: object) -> int:
    """``normkit kernels --device cuda [--widths 256,1024] [--dtypes bf16,fp32] [--norms layernorm,rmsnorm]``."""
    import triton

    device = args.device
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else GPU_WIDTHS
    ops = tuple(args.norms.split(",")) if args.norms else ("layernorm", "rmsnorm", "add_rmsnorm", "layernorm2d",
                                                           "rmsnorm2d", "groupnorm")
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"torch {torch.__version__}, triton {triton.__version__}, {name}; median ms (triton.testing.do_bench)")
    print(GPU_HEADER)
    run_device(device, ops=ops, widths=widths, dtypes=tuple(args.dtypes.split(",")))
    return 0


if __name__ == "__main__":  # OMP_NUM_THREADS=1 python -m normkit.bench.kernels --overhead [norm,norm] [--all-shapes]
    import sys

    if "--overhead" in sys.argv:
        names = [a for a in sys.argv[1:] if not a.startswith("--")]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per call, min of medians")
        print(OVERHEAD_HEADER)
        run_overhead(names[0].split(",") if names else None, small_only="--all-shapes" not in sys.argv)
