"""normkit's own CPU kernels (``csrc/cpu_norms.cpp``), used by the ``"compiled"`` backend on CPU.

Inductor (``torch.compile``) cannot generate two things the row-wise norms need to run at
memory speed on a CPU: a backward that sums ∂L/∂w, ∂L/∂b down the rows *inside* the row loop
(it always adds a second pass over ``g`` and ``x``), and a channels-first norm whose statistics
and output share one loop order. ``csrc/cpu_norms.cpp`` holds those kernels, written once for
the canonical layouts of :mod:`normkit.kernels.canonical` (rows, GroupNorm/InstanceNorm
segments, channels-first LayerNorm/RMSNorm) and for DyT, with the same closed-form math.

The source is compiled on first use with the system C++ compiler (``$NORMKIT_CXX``, ``$CXX``,
else ``g++`` / ``c++`` / ``clang++`` — Inductor needs a C++ compiler as well) into a per-user cache
(``$NORMKIT_CACHE_DIR``, default ``~/.cache/normkit``), keyed by the source, the flags, the
compiler and the machine architecture — not the CPU model, so a cache shared between machines
is reused — and loaded with :mod:`ctypes` (calls release the GIL). The library runs on any CPU of
that architecture: on x86-64 it holds three copies of the kernels (:data:`ISA_FLAGS`: the x86-64
baseline, x86-64-v3 = AVX2 + FMA, and x86-64-v4 = AVX-512 preferring 512-bit vectors), compiled in
parallel as separate translation units, and its entry points run the widest copy this CPU supports
(chosen once at load; ``$NORMKIT_CPU_ISA`` = ``baseline`` / ``avx2`` / ``avx512`` forces one, for
tests and benchmarks — one the CPU lacks falls back to the widest narrower one with a warning, it
never runs an unsupported instruction); :func:`status` and :func:`isa` name the copy in use.
Built with GCC it links ``libgomp.so.1``, which resolves to the copy torch has already loaded,
so the two share one thread pool (a clang build links LLVM's ``libomp``: a second pool, still
correct); the kernels use
``torch.get_num_threads()`` threads, parallel over rows / groups / position tiles (one long row
runs on one thread). Old builds stay in the cache until removed by hand. Where no compiler works
(or ``NORMKIT_CPU_KERNELS=0``) the ``"compiled"`` backend falls back to Inductor alone;
:func:`status` says which.

Coverage: contiguous (made so) float32/float64 CPU tensors with weight/bias of the same dtype
and no ``stats_dtype`` override; anything else goes through Inductor.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "cpu_norms.cpp"
# every source linked into the library: cpu_norms.cpp (which holds the ISA dispatcher) first, then the
# EvoNorm kernels (csrc/evonorm.cpp, whose entry points ask cpu_norms.cpp's nk_isa() for the copy to run)
SOURCES = (SOURCE, SOURCE.with_name("evonorm.cpp"), SOURCE.with_name("region_norm.cpp"),
           SOURCE.with_name("power_norm.cpp"), SOURCE.with_name("rep_batch_norm.cpp"))
# headers the sources include (part of the build's cache key, not compiled on their own)
HEADERS = (SOURCE.with_name("nk_isa.h"),)
# Compile flags of every variant. No -ffast-math: NaN must propagate. -fno-trapping-math lets the
# compiler vectorize floor and the selects of DyT's exp. -fvisibility=hidden: only nk_* is exported.
FLAGS = (
    "-O3", "-fopenmp", "-fPIC", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden",
)
LINK_FLAGS = ("-shared", "-fopenmp")
_MACHINE = platform.machine().lower()
# The kernel copies in the library, narrowest first (the first is the baseline, which also holds the
# entry points; csrc/cpu_norms.cpp has the same list). Nothing is compiled for the build machine's
# own CPU (no -march=native), so a cached build copied to another CPU never hits an illegal
# instruction. 512-bit vectors only in the AVX-512 copy (DyT is compute-bound: 15% faster there).
if _MACHINE in ("x86_64", "amd64"):
    ISA_FLAGS: dict[str, tuple[str, ...]] = {
        "baseline": ("-march=x86-64", "-DNK_X86_VARIANTS"),  # its entry points dispatch to the other two
        "avx2": ("-march=x86-64-v3",),
        "avx512": ("-march=x86-64-v4", "-mprefer-vector-width=512"),
    }
elif _MACHINE in ("aarch64", "arm64"):
    ISA_FLAGS = {"baseline": ("-march=armv8-a",)}
else:  # the compiler's default target is that architecture's baseline
    ISA_FLAGS = {"baseline": ()}
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_i64, _int, _dbl, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_SIGNATURES = {
    "seg_fwd": [_ptr] * 9 + [_i64] * 4 + [_int, _dbl, _int],
    "seg_bwd": [_ptr] * 9 + [_i64] * 4 + [_int, _int],
    "cf_fwd": [_ptr] * 7 + [_i64] * 3 + [_int, _dbl, _int, _int],
    "cf_bwd": [_ptr] * 8 + [_i64] * 3 + [_int, _int, _int],
    "dyt_fwd": [_ptr, _dbl] + [_ptr] * 3 + [_i64] * 3 + [_int],
    "dyt_bwd": [_ptr, _ptr, _dbl] + [_ptr] * 5 + [_i64] * 3 + [_int],
    "evo_b0_fwd": [_ptr] * 11 + [_i64] * 3 + [_int, _dbl, _int],
    "evo_b0_bwd": [_ptr] * 12 + [_i64] * 3 + [_int, _int],
    "evo_s0_fwd": [_ptr] * 7 + [_i64] * 4 + [_dbl, _int],
    "evo_s0_bwd": [_ptr] * 10 + [_i64] * 4 + [_int],
    "rn_fwd": [_ptr] * 9 + [_i64] * 3 + [_int, _dbl, _int],
    "rn_bwd_sums": [_ptr] * 12 + [_i64] * 3 + [_int, _int],
    "rn_bwd_dx": [_ptr] * 11 + [_i64] * 3 + [_int, _int],
    "rn_pool": [_ptr] * 3 + [_i64] * 3 + [_int],
    "rn_conv": [_ptr] * 4 + [_i64] * 6 + [_int],
    "rn_conv_dw": [_ptr] * 3 + [_i64] * 6 + [_int],
    "pn_fwd": [_ptr] * 8 + [_i64] * 4 + [_int, _dbl, _dbl, _int],
    "pn_bwd": [_ptr] * 6 + [_dbl] + [_ptr] * 3 + [_i64] * 3 + [_int],
    "prepbn_stats": [_ptr] * 5 + [_i64] * 2 + [_int, _dbl, _int],
    "prepbn_out": [_ptr] * 7 + [_dbl, _ptr] + [_i64] * 2 + [_int, _int],
    "prepbn_bwd": [_ptr] * 8 + [_dbl] + [_ptr] * 2 + [_i64] * 2 + [_int] * 3,
}

build_seconds: float | None = None  # compile time of this process's build (None: loaded from cache)
_failure: str | None = None
_isa: str | None = None  # the kernel copy in use
_isas: list[str] = []  # the copies this CPU runs, narrowest first
_isa_note = ""  # how it was chosen, for status()


def _compiler() -> str | None:
    for name in (os.environ.get("NORMKIT_CXX"), os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("NORMKIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "normkit")
    return Path(root) / "kernels"


def _cache_key(cxx: str, version: str) -> str:
    """What the library depends on: source, flags, compiler, architecture — not this CPU's model
    or feature flags (every copy is for a fixed ISA, chosen at run time), so a cache directory
    shared between machines holds one build per architecture and compiler."""
    sources = tuple(src.read_text() for src in (*SOURCES, *HEADERS))
    parts = (*sources, " ".join(FLAGS), " ".join(LINK_FLAGS), repr(ISA_FLAGS), cxx, version, _MACHINE)
    return hashlib.sha256(b"\0".join(s.encode() for s in parts)).hexdigest()[:20]


def _build(cxx: str) -> Path:
    global build_seconds
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    out = _cache_dir() / f"cpu_norms_{_cache_key(cxx, version)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # one translation unit per copy and source, compiled in parallel; the baseline's also have the entry points
        jobs = []
        for i, (isa, flags) in enumerate(ISA_FLAGS.items()):
            for src in SOURCES:
                obj, log = Path(tmp) / f"{isa}_{src.stem}.o", Path(tmp) / f"{isa}_{src.stem}.log"
                defines = [f"-DNK_ISA=nk_{isa}"] + (["-DNK_DISPATCH"] if i == 0 else [])
                with open(log, "w") as err:
                    cmd = [cxx, *FLAGS, *flags, *defines, "-c", str(src), "-o", str(obj)]
                    jobs.append((obj, log, subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)))
        failed = [log.read_text() for _, log, proc in jobs if proc.wait() != 0]
        if failed:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{failed[0][-2000:]}")
        # the baseline objects first: of the inline library functions every object carries
        # (std::vector members), the linker keeps the first copy, which then runs on any CPU
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run(
            [cxx, *LINK_FLAGS, *(str(obj) for obj, _, _ in jobs), "-o", str(tmp_so)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed to link {SOURCE.name}:\n{proc.stderr[-2000:]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file
    build_seconds = time.perf_counter() - start
    return out


def _choose_isa(request: str, names: list[str], supported: list[str]) -> tuple[str, str | None]:
    """The kernel copy to use for ``$NORMKIT_CPU_ISA`` = ``request``, and a warning or None.

    ``names``: the library's copies, narrowest first; ``supported``: those this CPU runs (always
    the baseline). Empty or ``auto``: the widest supported. A copy the CPU lacks, or an unknown
    name, falls back to the widest supported copy narrower than the one asked for, with a warning
    (a shared job script that pins ``avx512`` still runs on an AVX2 node)."""
    request = request.strip().lower()
    best = supported[-1]
    if request in ("", "auto"):
        return best, None
    if request in supported:
        return request, None
    if request in names:
        below = [n for n in supported if names.index(n) < names.index(request)]
        return below[-1], f"NORMKIT_CPU_ISA={request}: this CPU does not support it; using {below[-1]}"
    return best, f"NORMKIT_CPU_ISA={request} is not one of auto, {', '.join(names)}; using {best}"


def _select_isa(lib: ctypes.CDLL) -> None:
    global _isa, _isa_note, _isas
    lib.nk_isa_name.restype = ctypes.c_char_p
    lib.nk_isa_name.argtypes = lib.nk_isa_supported.argtypes = lib.nk_set_isa.argtypes = [_int]
    names = [lib.nk_isa_name(i).decode() for i in range(lib.nk_isa_count())]
    supported = [n for i, n in enumerate(names) if lib.nk_isa_supported(i)]
    request = os.environ.get("NORMKIT_CPU_ISA", "auto")
    name, warning = _choose_isa(request, names, supported)
    if warning is not None:
        warnings.warn(f"normkit: {warning}", stacklevel=4)
    if not lib.nk_set_isa(names.index(name)):  # cannot happen: name is supported
        raise RuntimeError(f"the CPU kernels refused the {name} copy")
    _isa, _isas = name, supported
    if warning is not None:
        _isa_note = f"{name} code, NORMKIT_CPU_ISA={request.strip()} not available here"
    elif request.strip().lower() in ("", "auto"):
        _isa_note = f"{name} code, the widest of {'/'.join(supported)} this CPU runs"
    else:
        _isa_note = f"{name} code, forced by NORMKIT_CPU_ISA"


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _failure
    if os.environ.get("NORMKIT_CPU_KERNELS", "1") == "0":
        _failure = "disabled by NORMKIT_CPU_KERNELS=0"
        return None
    cxx = _compiler()
    if cxx is None:
        _failure = "no C++ compiler found ($NORMKIT_CXX, $CXX, g++, c++, clang++)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
        _select_isa(lib)
    except (OSError, RuntimeError, AttributeError) as e:
        _failure = (str(e).splitlines() or [repr(e)])[0]
        warnings.warn(f"normkit: CPU kernels unavailable, the 'compiled' backend uses Inductor only ({e})", stacklevel=3)
        return None
    for name, args in _SIGNATURES.items():
        for suffix in _DTYPES.values():
            fn = getattr(lib, f"nk_{name}_{suffix}")
            fn.argtypes, fn.restype = args, None
    return lib


def available() -> bool:
    """True when the kernels are built (or build now) and loaded."""
    return _library() is not None


def isa() -> str | None:
    """The kernel copy in use (``"baseline"``, ``"avx2"``, ``"avx512"``), None when the kernels are off."""
    return _isa if _library() is not None else None


def isas() -> list[str]:
    """The kernel copies in the library that this CPU runs, narrowest first (empty when the kernels are off)."""
    return list(_isas) if _library() is not None else []


def status() -> str:
    """One line for reports: where the kernels come from and which copy runs, or why they are not used."""
    if _library() is None:
        return f"normkit CPU kernels off: {_failure}"
    how = f"built in {build_seconds:.1f} s" if build_seconds is not None else "loaded from cache"
    return f"normkit CPU kernels on ({how}, {_cache_dir()}; {_isa_note})"


def supports(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the kernels handle ``x`` (and these same-dtype parameters) — else use Inductor.

    ``x`` must be contiguous: a strided view (e.g. channels_last memory format) stays on the
    Inductor path, which keeps its layout, instead of being copied here.
    """
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() == 0 or not x.is_contiguous():
        return False
    if any(p is not None and (p.dtype != x.dtype or p.device.type != "cpu") for p in params):
        return False
    return available()


def _call(name: str, dtype: torch.dtype, *args: Tensor | None | int | float) -> None:
    """Run kernel ``name`` for ``dtype``. Tensors go in as pointers; ``args`` holds them, so every
    temporary made in the argument list stays alive until the kernel returns (turning a tensor into
    a bare address first would let Python free it before the call)."""
    # the wrappers below make every tensor contiguous and of x's dtype (``supports`` checked the
    # parameters); checking each again here cost a fifth of a small call
    ptrs = [a.data_ptr() if isinstance(a, Tensor) else a for a in args]
    fn = _entry_points.get((name, dtype))
    if fn is None:
        fn = _entry_points[(name, dtype)] = getattr(_library(), f"nk_{name}_{_DTYPES[dtype]}")
    fn(*ptrs)


_entry_points: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
_constants: dict[tuple[int, torch.dtype, float], Tensor] = {}


def _or_full(p: Tensor | None, n: int, like: Tensor, fill: float) -> Tensor:
    """``p`` (contiguous), or ``n`` copies of ``fill``: the kernels always take a weight and a bias.

    The constant vectors are made once per (size, dtype) and reused (the kernels only read them):
    a fresh ``torch.full`` per call was a visible share of a small call's cost.
    """
    if p is not None:
        return p.contiguous()
    key = (n, like.dtype, fill)
    t = _constants.get(key)
    if t is None:
        if len(_constants) > 64:
            _constants.clear()
        t = _constants[key] = torch.full((n,), fill, dtype=like.dtype)
    return t


GRAIN = 32768  # elements below which a call runs on one thread, as ATen's parallel_for grain size


def _threads(work: int) -> int:
    """Threads for a call over ``work`` elements: one for small inputs (starting a parallel region
    costs more than the work, and much more when the cores are busy), else torch's setting."""
    return 1 if work < GRAIN else max(1, torch.get_num_threads())


def seg_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    n: int, c: int, length: int, groups: int, center: bool, eps: float, stats_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``n`` contiguous segments of ``c·length`` values; the affine of segment i is
    ``weight[(i % groups)·c + k]``. Returns ``(y, s, mean, var, rstd)``: y and s in x's shape, the
    statistics flat or in ``stats_shape`` (n elements). ``x`` must be contiguous (:func:`supports`)."""
    res = None if residual is None else residual.contiguous()
    s = x if res is None else torch.empty_like(x)
    y = torch.empty_like(x)
    mean, var, rstd = (torch.empty(stats_shape or (n,), dtype=x.dtype) for _ in range(3))
    w = _or_full(weight, groups * c, x, 1.0)
    b = _or_full(bias, groups * c, x, 0.0)
    _call(
        "seg_fwd", x.dtype, x, res, s, w, b, y, mean, var, rstd,
        n, c, length, groups, int(center), float(eps), _threads(x.numel()),
    )
    return y, s, mean, var, rstd


def seg_backward(
    g: Tensor, gs: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    n: int, c: int, length: int, groups: int, center: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """∂L/∂x (plus ``gs``, the gradient reaching ``s`` directly), ∂L/∂w and ∂L/∂b of :func:`seg_forward`."""
    g, s = g.contiguous(), s.contiguous()
    gs = None if gs is None else gs.contiguous()
    dx = torch.empty_like(s)
    dw = torch.empty(groups * c, dtype=s.dtype) if want_w else None
    db = torch.empty(groups * c, dtype=s.dtype) if want_b else None
    _call(
        "seg_bwd", s.dtype, g, gs, s, _or_full(weight, groups * c, s, 1.0), mean, rstd,
        dx, dw, db, n, c, length, groups, int(center), _threads(s.numel()),
    )
    return dx, dw, db


def cf_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, n: int, c: int, length: int, center: bool, eps: float,
    stats_shape: tuple[int, ...] | None = None, y_nlc: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Channels-first ``(n, c, length)`` normalized over c at every (n, l). Returns ``(y, x, mean, var, rstd)``
    (statistics flat, or in ``stats_shape``). ``x`` must be contiguous. y has x's shape; its memory is x's
    ``(n, c, length)`` order, or with ``y_nlc`` ``(n, length, c)``: :func:`nlc_empty`'s strides, those of
    timm's LayerNorm2d output (channels-last strides for an ``(N, C, H, W)`` x)."""
    y = nlc_empty(x, n, c, length) if y_nlc else torch.empty_like(x)
    mean, var, rstd = (torch.empty(stats_shape or (n * length,), dtype=x.dtype) for _ in range(3))
    _call(
        "cf_fwd", x.dtype, x, _or_full(weight, c, x, 1.0), _or_full(bias, c, x, 0.0), y, mean, var, rstd,
        n, c, length, int(center), float(eps), int(y_nlc), _threads(x.numel()),
    )
    return y, x, mean, var, rstd


def nlc_empty(like: Tensor, n: int, c: int, length: int) -> Tensor:
    """An empty tensor of ``like``'s shape — ``(n, [1, ...], c, *spatial)``, spatial sizes multiplying to ``length`` —
    whose memory is ``(n, length, c)``: element (i, k, l) at ``i·c·length + l·c + k``. For ``(N, C, H, W)``
    these are channels_last strides (what ``x.movedim(1, -1).contiguous().movedim(-1, 1)`` has), for
    the canonical ``(N, 1, C, L)`` view ``(C·L, C·L, 1, C)``; a fake tensor gets the same strides."""
    return like.new_empty((n, length, c)).transpose(1, 2).view(like.shape)


def _nlc_or_ncl(g: Tensor, n: int, c: int, length: int) -> tuple[Tensor, bool]:
    """``g`` (n·c·length values shaped as the input) as ``(n, c, length)`` plus whether its memory is
    ``(n, length, c)``; any other layout (expanded, sliced) is copied to contiguous ``(n, c, length)``."""
    gv = g.reshape(n, c, length)  # a view for both layouts (it copies only an odd one, then contiguous)
    if gv.is_contiguous():
        return gv, False
    if gv.transpose(1, 2).is_contiguous():
        return gv, True
    return gv.contiguous(), False


def cf_backward(
    g: Tensor, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    n: int, c: int, length: int, center: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(∂x, ∂w, ∂b)`` of :func:`cf_forward`; ∂x in s's shape, contiguous. ``g`` is read in place when its
    memory is ``(n, c, length)`` or ``(n, length, c)`` (:func:`cf_forward`'s ``y_nlc`` output), else copied."""
    g, g_nlc = _nlc_or_ncl(g, n, c, length)
    s = s.contiguous()
    dx = torch.empty_like(s)
    dw = torch.empty(c, dtype=s.dtype) if want_w else None
    db = torch.empty(c, dtype=s.dtype) if want_b else None
    _call(
        "cf_bwd", s.dtype, g, s, _or_full(weight, c, s, 1.0), mean, rstd,
        dx, dw, db, n, c, length, int(center), int(g_nlc), _threads(s.numel()),
    )
    return dx, dw, db


def _dyt_view(x: Tensor, channels_last: bool) -> tuple[int, int, int]:
    if channels_last:
        c = x.shape[-1]
        return x.numel() // max(c, 1), c, 1
    return x.shape[0], x.shape[1], x[0, 0].numel() if x.dim() > 2 else 1


def dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    """``weight · tanh(alpha · x) + bias`` with the per-channel affine on the last (channels-last) or second dim."""
    n, c, length = _dyt_view(x, channels_last)
    y = torch.empty_like(x)
    _call(
        "dyt_fwd", x.dtype, x, float(alpha), _or_full(weight, c, x, 1.0), _or_full(bias, c, x, 0.0), y, n, c, length,
        _threads(x.numel()),
    )
    return y


def dyt_backward(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool, want_w: bool, want_b: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(∂L/∂x, ∂L/∂α, ∂L/∂w, ∂L/∂b)`` of :func:`dyt_forward`, in one pass over ``g`` and ``x``."""
    g, x = g.contiguous(), x.contiguous()
    n, c, length = _dyt_view(x, channels_last)
    dx = torch.empty_like(x)
    dalpha = ctypes.c_double(0.0)
    dw = torch.empty(c, dtype=x.dtype) if want_w else None
    db = torch.empty(c, dtype=x.dtype) if want_b else None
    _call(
        "dyt_bwd", x.dtype, g, x, float(alpha), _or_full(weight, c, x, 1.0), dx, ctypes.addressof(dalpha),
        dw, db, n, c, length, _threads(x.numel()),
    )
    return dx, torch.tensor(dalpha.value, dtype=alpha.dtype).reshape(alpha.shape), dw, db


def evonorm_b0_forward(
    x: Tensor, running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None, v: Tensor,
    training: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-B0 over contiguous ``(N, C, *spatial)`` ``x`` (``csrc/evonorm.cpp``).

    Returns ``(y, var_b, mean_b, a, mean_i, std_i)``: per channel the biased batch variance
    (training; eval: a copy of ``running_var``), the batch mean (eval: 0) and ``a = sqrt(var_b + eps)``;
    per (n, c) row, flat, its mean and ``sqrt(Var + eps)``. ``running_var`` is used in eval only."""
    n, c = x.shape[:2]
    length = x.numel() // (n * c)
    y = torch.empty_like(x)
    var_b, mean_b, a = (torch.empty(c, dtype=x.dtype) for _ in range(3))
    mean_i, std_i = (torch.empty(n * c, dtype=x.dtype) for _ in range(2))
    rvar = None if training else running_var.contiguous()
    _call(
        "evo_b0_fwd", x.dtype, x, _or_full(weight, c, x, 1.0), _or_full(bias, c, x, 0.0), v.contiguous(), rvar,
        y, var_b, mean_b, a, mean_i, std_i, n, c, length, int(training), float(eps), _threads(x.numel()),
    )
    return y, var_b, mean_b, a, mean_i, std_i


def evonorm_b0_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, v: Tensor, mean_i: Tensor, std_i: Tensor, mean_b: Tensor, a: Tensor,
    training: bool, want_w: bool, want_b: bool, want_v: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂w, ∂b, ∂v)`` of :func:`evonorm_b0_forward` (None where not wanted)."""
    return _evonorm_backward("evo_b0_bwd", g, x, weight, v, (mean_i, std_i, mean_b, a), int(training),
                             (want_w, want_b, want_v))


def evonorm_s0_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, v: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """EvoNorm-S0 over contiguous ``(N, C, *spatial)`` ``x`` with ``groups`` groups of C/groups channels
    (``csrc/evonorm.cpp``). Returns ``(y, mean, rstd)``, the statistics flat, one per (n, group)."""
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    mean, rstd = (torch.empty(n * groups, dtype=x.dtype) for _ in range(2))
    _call(
        "evo_s0_fwd", x.dtype, x, _or_full(weight, c, x, 1.0), _or_full(bias, c, x, 0.0), v.contiguous(),
        y, mean, rstd, n, c, x.numel() // (n * c), groups, float(eps), _threads(x.numel()),
    )
    return y, mean, rstd


def evonorm_s0_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, v: Tensor, mean: Tensor, rstd: Tensor, groups: int,
    want_w: bool, want_b: bool, want_v: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂w, ∂b, ∂v)`` of :func:`evonorm_s0_forward` (None where not wanted)."""
    return _evonorm_backward("evo_s0_bwd", g, x, weight, v, (mean, rstd), groups, (want_w, want_b, want_v))


def _evonorm_backward(
    name: str, g: Tensor, x: Tensor, weight: Tensor | None, v: Tensor, stats: tuple[Tensor, ...], flag: int,
    wants: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Both EvoNorm backward kernels take ``(g, x, w, v, *stats, dx, dw, db, dv, N, C, L, flag, threads)``
    (``flag``: B0's training, S0's group count)."""
    g, x = g.contiguous(), x.contiguous()
    n, c = x.shape[:2]
    dx = torch.empty_like(x)
    dw, db, dv = (torch.empty(c, dtype=x.dtype) if want else None for want in wants)
    _call(
        name, x.dtype, g, x, _or_full(weight, c, x, 1.0), v.contiguous(), *stats, dx, dw, db, dv,
        n, c, x.numel() // (n * c), flag, _threads(x.numel()),
    )
    return dx, dw, db, dv


def region_norm_forward(
    x: Tensor, m: Tensor, gc: Tensor, bc: Tensor, gmap: Tensor | None, bmap: Tensor | None, per_sample: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Region Normalization of contiguous ``(N, C, *spatial)`` ``x`` under a binary one-channel mask ``m``
    ``(N, 1, *spatial)`` (``csrc/region_norm.cpp``): ``y = (x − μ_r)·ρ_r·gc_r·gmap + bc_r + bmap``.

    ``gc``, ``bc``: ``(C, 2)`` per-(channel, region) scale and shift (region ``m = 1`` first); ``gmap``,
    ``bmap``: ``(N, 1, *spatial)`` maps or None (both or neither). Returns ``(y, mu, rho)``, the statistics
    ``(N, C, 2)`` with ``per_sample`` else ``(C, 2)``."""
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    stats = (n, c, 2) if per_sample else (c, 2)
    mu, rho = torch.empty(stats, dtype=x.dtype), torch.empty(stats, dtype=x.dtype)
    _call(
        "rn_fwd", x.dtype, x, m.contiguous(), gc.contiguous(), bc.contiguous(),
        None if gmap is None else gmap.contiguous(), None if bmap is None else bmap.contiguous(), y, mu, rho,
        n, c, x.numel() // (n * c), int(per_sample), float(eps), _threads(x.numel()),
    )
    return y, mu, rho


def region_norm_backward(
    g: Tensor, x: Tensor, m: Tensor, gc: Tensor, gmap: Tensor | None, mu: Tensor, rho: Tensor, per_sample: bool,
    wants: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂gc, ∂bc, ∂gmap, ∂bmap)`` of :func:`region_norm_forward` (None where ``wants`` says not wanted)."""
    sums, dgc, dbc, dgm, dbm = region_norm_backward_sums(g, x, m, gc, gmap, mu, rho, per_sample, wants[1:])
    dx = region_norm_backward_dx(g, x, m, gc, gmap, mu, rho, per_sample, sums) if wants[0] else None
    return dx, dgc, dbc, dgm, dbm


def region_norm_backward_sums(
    g: Tensor, x: Tensor, m: Tensor, gc: Tensor, gmap: Tensor | None, mu: Tensor, rho: Tensor, per_sample: bool,
    wants: tuple[bool, bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The first half of the backward: ``(sums, ∂gc, ∂bc, ∂gmap, ∂bmap)``, ``sums`` the per-row region sums
    (float64, for :func:`region_norm_backward_dx`); one read of ``g`` and ``x``."""
    g, x = g.contiguous(), x.contiguous()
    n, c = x.shape[:2]
    sums = torch.empty(6 * n * c, dtype=torch.float64)
    shapes = ((c, 2), (c, 2), m.shape, m.shape)
    dgc, dbc, dgm, dbm = (torch.empty(s, dtype=x.dtype) if w else None for s, w in zip(shapes, wants))
    _call(
        "rn_bwd_sums", x.dtype, g, x, m.contiguous(), gc.contiguous(), None if gmap is None else gmap.contiguous(),
        mu, rho, sums, dgc, dbc, dgm, dbm, n, c, x.numel() // (n * c), int(per_sample), _threads(x.numel()),
    )
    return sums, dgc, dbc, dgm, dbm


def region_norm_backward_dx(
    g: Tensor, x: Tensor, m: Tensor, gc: Tensor, gmap: Tensor | None, mu: Tensor, rho: Tensor, per_sample: bool,
    sums: Tensor, pool_grad: Tensor | None = None, idx: Tensor | None = None,
) -> Tensor:
    """The second half: ∂x in one write, plus RN-L's pooling gradient when ``pool_grad`` (the gradient of
    :func:`region_pool`'s output) and its arg-max ``idx`` (int32) are given."""
    g, x = g.contiguous(), x.contiguous()
    n, c = x.shape[:2]
    dx = torch.empty_like(x)
    _call(
        "rn_bwd_dx", x.dtype, g, x, m.contiguous(), gc.contiguous(), None if gmap is None else gmap.contiguous(),
        mu, rho, sums, None if pool_grad is None else pool_grad.contiguous(), None if idx is None else idx.contiguous(),
        dx, n, c, x.numel() // (n * c), int(per_sample), _threads(x.numel()),
    )
    return dx


def region_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """RN-L's pooled input ``[mean_c x, max_c x]`` ``(N, 2, *spatial)`` of contiguous ``(N, C, *spatial)`` ``x``
    and the arg-max channel ``(N, 1, *spatial)`` (int32; ties: the first channel), in one read of x."""
    n, c = x.shape[:2]
    out = x.new_empty((n, 2, *x.shape[2:]))
    idx = torch.empty((n, 1, *x.shape[2:]), dtype=torch.int32)
    _call("rn_pool", x.dtype, x, out, idx, n, c, x.numel() // max(n * c, 1), _threads(x.numel()))
    return out, idx


def map_conv(s: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``conv2d(s, w, b, padding=k // 2)`` for few-channel ``(N, Ci, H, W)`` maps (direct, per output plane)."""
    s, w = s.contiguous(), w.contiguous()
    n, ci, h, wd = s.shape
    co, k = w.shape[0], w.shape[-1]
    y = s.new_empty((n, co, h, wd))
    _call("rn_conv", s.dtype, s, w, None if b is None else b.contiguous(), y, n, ci, co, h, wd, k,
          _threads(y.numel() * ci * k * k // 8))
    return y


def map_conv_weight_grad(s: Tensor, g: Tensor, k: int) -> Tensor:
    """The weight gradient ``(Co, Ci, k, k)`` of :func:`map_conv` for its input ``s`` and output gradient ``g``."""
    s, g = s.contiguous(), g.contiguous()
    n, ci, h, wd = s.shape
    co = g.shape[1]
    dw = s.new_empty((co, ci, k, k))
    _call("rn_conv_dw", s.dtype, s, g, dw, n, ci, co, h, wd, k, _threads(g.numel() * ci * k * k // 8))
    return dw


def power_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_phi: Tensor, iters: Tensor,
    groups: int, warmup: int, paper_exact: bool, eps: float, group_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """PowerNorm's training forward over contiguous ``(N, C)`` token rows (``csrc/power_norm.cpp``):
    GroupScaling in ``groups`` groups (0: none), the ψ-normalization (batch statistics while
    ``iters + 1 ≤ warmup``, else ``running_phi``) and the affine. Reads ``running_phi`` and ``iters``,
    updates neither. Returns ``(y, rrow, stats)``: the (row, group) GroupScaling factors (N·groups)
    and ``stats`` = ``[inv_f, inv_bwd, Σ_rows z², ψ²_B]`` (C each)."""
    n, c = x.shape
    y = torch.empty_like(x)
    rrow = torch.empty(n * groups, dtype=x.dtype)
    stats = torch.empty(4 * c, dtype=x.dtype)
    _call(
        "pn_fwd", x.dtype, x, _or_full(weight, c, x, 1.0), _or_full(bias, c, x, 0.0),
        running_phi.to(x.dtype).contiguous(), iters.contiguous(), y, rrow if groups else None, stats,
        n, c, groups, warmup, int(paper_exact), float(eps), float(group_eps), _threads(x.numel()),
    )
    return y, rrow, stats


def power_norm_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, rrow: Tensor, stats: Tensor, ema_gz: Tensor, keep: float, groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """PowerNorm's approximate backward (``csrc/power_norm.cpp``) from :func:`power_norm_forward`'s
    ``rrow`` and ``stats``, with ``keep`` = 1 − α_bkw: ``(∂x, Σ_rows ∂L/∂y·xs, Σ_rows ∂L/∂y)``
    (xs the GroupScaled input; the caller forms ∂w, ∂b and the ``ema_gz`` update from the sums)."""
    n, c = x.shape
    dx = torch.empty_like(x)
    colsum, gsum = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    _call(
        "pn_bwd", x.dtype, g.contiguous(), x, _or_full(weight, c, x, 1.0), rrow if groups else None, stats,
        ema_gz.to(x.dtype).contiguous(), float(keep), dx, colsum, gsum, n, c, groups, _threads(x.numel()),
    )
    return dx, colsum, gsum


def prepbn_stats(x: Tensor, has_ln: bool, ln_eps: float) -> tuple[Tensor | None, Tensor | None, Tensor, bool]:
    """Pass 1 of RepBN / PRepBN's mix over contiguous ``(R, C)`` tokens (``csrc/rep_batch_norm.cpp``): per-row
    LayerNorm mean and rstd (``has_ln``; else None) and the per-channel batch mean and biased variance in
    float64 (``(2, C)``), in one read of ``x``. The flag is False where a variance is not finite or a channel
    is ill-conditioned for the one-read variance (see the source): the caller's Welford path."""
    r, c = x.shape
    row_mean = torch.empty(r, dtype=x.dtype) if has_ln else None
    row_rstd = torch.empty(r, dtype=x.dtype) if has_ln else None
    col = torch.empty(2, c, dtype=torch.float64)
    ok = ctypes.c_double(0.0)
    _call(
        "prepbn_stats", x.dtype, x, row_mean, row_rstd, col, ctypes.addressof(ok), r, c, int(has_ln), float(ln_eps),
        _threads(x.numel()),
    )
    return row_mean, row_rstd, col, ok.value == 1.0


def prepbn_out(
    x: Tensor, row_mean: Tensor | None, row_rstd: Tensor | None, w1: Tensor | None, rg: Tensor, mu: Tensor,
    bb: Tensor, sa: float,
) -> Tensor:
    """Pass 2: ``y = x̂_LN·w1 + (x − mu)·rg + x·sa + bb`` (no LN terms when ``row_mean`` is None)."""
    r, c = x.shape
    y = torch.empty_like(x)
    _call(
        "prepbn_out", x.dtype, x, row_mean, row_rstd, w1, rg, mu, bb, float(sa), y, r, c, int(row_mean is not None),
        _threads(x.numel()),
    )
    return y


def prepbn_backward(
    g: Tensor, x: Tensor, row_mean: Tensor | None, row_rstd: Tensor | None, w1: Tensor | None, gb: Tensor,
    mu: Tensor, r: Tensor, sa: float, training: bool,
) -> tuple[Tensor, Tensor]:
    """∂L/∂x of :func:`prepbn_out` (``rg = gb·r``; in training with ``mu``, ``r`` the batch statistics of ``x``)
    and the float64 per-channel sums ``(3, C)``: Σ g, Σ g·(x − mu)·r, Σ g·x̂_LN (0 without LN)."""
    g = g.contiguous()
    rows, c = x.shape
    dx = torch.empty_like(x)
    sums = torch.empty(3, c, dtype=torch.float64)
    _call(
        "prepbn_bwd", x.dtype, g, x, row_mean, row_rstd, w1, gb, mu, r, float(sa), dx, sums, rows, c,
        int(row_mean is not None), int(training), _threads(x.numel()),
    )
    return dx, sums
