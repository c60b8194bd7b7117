"""Launchers for the Triton kernels of :mod:`normkit.kernels.triton.source`: tile sizes, grids, buffers.

Tile and warps by width (elements of the reduced extent; ``MAX_TILE_BYTES`` = 64 KiB of input per
tile, as Triton's LayerNorm tutorial: 16384 float32, 32768 bfloat16/float16, 8192 float64 elements):

=====================  ========================================  ===================================
layout                 tile ``[BLOCK_C, BLOCK_L]``                 one tile (``SINGLE``) when
=====================  ========================================  ===================================
rows (L = 1)           ``[next_pow2(C), 1]``, capped at the max    C ≤ max tile elements
channels-first         ``BLOCK_C = next_pow2(C)`` (capped),        C ≤ max tile elements
                       ``BLOCK_L = 4096 / BLOCK_C`` (1 … L)
segments (GroupNorm)   whole ``Cg × L`` segment if it fits, else   next_pow2(Cg)·next_pow2(L) ≤ max
                       ``[min(next_pow2(Cg), 16), 4096 / that]``
=====================  ========================================  ===================================

``num_warps`` by tile elements: ≤ 512 → 1·2, 1024 → 4, 2048–4096 → 8, 8192–16384 → 16, more → 32
(the shape of Liger's and the tutorial's tables; not yet tuned on a GPU). Backward programs: 2 per
SM on CUDA (each owns a row of the partial ∂w/∂b buffer), 4 under the interpreter.

A float64 input computes in float64; float32, bfloat16 and float16 compute their statistics in
float32. Kernels are compiled with ``triton.jit`` for CUDA tensors and wrapped for Triton's
interpreter when ``TRITON_INTERPRET=1`` (CPU tensors; numpy, slow, for tests).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from normkit.kernels.triton import source

MAX_TILE_BYTES = 1 << 16  # tests lower it to exercise the looping (long-row) paths on small inputs
TILE_2D = 4096  # elements of a channels-first / segment tile when the reduction does not fit one tile


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (Triton's interpreter: CPU tensors accepted)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def imported_for_interpreter() -> bool:
    """Whether ``triton`` was imported with ``TRITON_INTERPRET=1`` set: Triton fixes the mode of its own
    library functions (``tl.sum``, ``tl.zeros``, …) then, so the interpreter works only in that case."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.zeros, InterpretedFunction)


@functools.cache
def _kernel(name: str, interpret: bool) -> Any:
    fn = getattr(source, name)
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        if not imported_for_interpreter():
            raise RuntimeError(
                "normkit's Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is first "
                "imported (Triton fixes the mode of its library then); set it in the environment of the process"
            )
        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def kernel(name: str, x: Tensor) -> Any:
    """The kernel ``name`` for tensors like ``x``: interpreted for CPU tensors, compiled otherwise."""
    return _kernel(name, not x.is_cuda or interpreting())


def num_warps(tile: int) -> int:
    for limit, warps in ((256, 1), (512, 2), (1024, 4), (4096, 8), (16384, 16)):
        if tile <= limit:
            return warps
    return 32


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, Any]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _max_tile(x: Tensor) -> int:
    return max(MAX_TILE_BYTES // x.element_size(), 2)


def tile(x: Tensor, c: int, length: int, seg: bool) -> tuple[int, int, bool]:
    """``(BLOCK_C, BLOCK_L, SINGLE)`` for a reduction over ``c`` channels (and ``length`` positions if ``seg``)."""
    cap = _max_tile(x)
    pc, pl = triton.next_power_of_2(max(c, 1)), triton.next_power_of_2(max(length, 1))
    if seg:
        if pc * pl <= cap:
            return pc, pl, True
        bc = min(pc, 16, cap)
        return bc, max(1, min(pl, min(TILE_2D, cap) // bc)), False
    if length == 1:
        return min(pc, cap), 1, pc <= cap
    bc = min(pc, cap)
    return bc, max(1, min(pl, min(TILE_2D, cap) // bc)), pc <= cap


def _programs(x: Tensor, units: int) -> int:
    if x.is_cuda and not interpreting():
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(units, 2 * sms))
    return max(1, min(units, 4))


def _column_sums(partial: Tensor, x: Tensor) -> Tensor:
    """Sum of the partial buffer's rows, in row order (deterministic)."""
    rows, k = partial.shape
    out = torch.zeros(k, dtype=partial.dtype, device=partial.device)
    if k == 0 or rows == 0:
        return out
    block = min(triton.next_power_of_2(k), 1024)
    kernel("partial_sum", x)[(triton.cdiv(k, block),)](partial, out, rows, k, BLOCK=block, num_warps=4)
    return out


def norm_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, seg: bool, center: bool, eps: float,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """``(y, s, mean, var, rstd)`` of a contiguous canonical ``(N, G, Cg, L)`` tensor; ``s = x + residual``
    (None without one); statistics shaped ``(N, G, 1, 1)`` (``seg``) or ``(N, G, 1, L)``."""
    n, g, cg, length = x.shape
    acc, acc_tl = _acc(x.dtype)
    bc, bl, single = tile(x, cg, length, seg)
    lblocks = 1 if seg else triton.cdiv(length, bl)
    stats_shape = (n, g, 1, 1) if seg else (n, g, 1, length)
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    mean, var, rstd = (torch.empty(stats_shape, dtype=acc, device=x.device) for _ in range(3))
    grid = n * g * lblocks
    if grid and x.numel():
        kernel("norm_fwd", x)[(grid,)](
            x, residual if residual is not None else x, s if s is not None else y,
            y, weight if weight is not None else x, bias if bias is not None else x, mean, var, rstd,
            cg, length, g, lblocks, cg * length if seg else cg, eps,
            ACC=acc_tl, HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            CENTER=center, SEG=seg, SINGLE=single, BLOCK_C=bc, BLOCK_L=bl, num_warps=num_warps(bc * bl),
        )
    return y, s, mean, var, rstd


def norm_backward(
    gy: Tensor, gs: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    seg: bool, center: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(∂x, ∂w, ∂b)`` of :func:`norm_forward`; ∂w/∂b flat (``G·Cg``) in the accumulation dtype, or None."""
    n, g, cg, length = s.shape
    acc, acc_tl = _acc(s.dtype)
    gy = gy.contiguous()
    gs = None if gs is None else gs.contiguous()
    bc, bl, single = tile(s, cg, length, seg)
    lblocks = 1 if seg else triton.cdiv(length, bl)
    units = n * g * lblocks
    progs = _programs(s, units)
    per = triton.cdiv(units, progs) if units else 0
    k = g * cg
    reg = single and g == 1
    alloc = torch.empty if reg else torch.zeros
    pw = alloc((progs, k), dtype=acc, device=s.device) if want_w else None
    pb = alloc((progs, k), dtype=acc, device=s.device) if want_b else None
    dx = torch.empty_like(s)
    if units and s.numel():
        kernel("norm_bwd", s)[(progs,)](
            gy, gs if gs is not None else gy, s, weight if weight is not None else s, mean, rstd, dx,
            pw if pw is not None else mean, pb if pb is not None else mean,
            cg, length, g, lblocks, units, per, k, cg * length if seg else cg,
            ACC=acc_tl, HAS_W=weight is not None, HAS_GS=gs is not None, CENTER=center, SEG=seg,
            SINGLE=single, WANT_W=want_w, WANT_B=want_b, REG_ACC=reg, BLOCK_C=bc, BLOCK_L=bl,
            num_warps=num_warps(bc * bl),
        )
    elif pw is not None or pb is not None:  # no units: the sums are zero
        pw = None if pw is None else pw.zero_()
        pb = None if pb is None else pb.zero_()
    dw = None if pw is None else _column_sums(pw, s)
    db = None if pb is None else _column_sums(pb, s)
    return dx, dw, db


def _dyt_view(x: Tensor, channels_last: bool) -> tuple[int, int, int]:
    if channels_last:
        c = x.shape[-1]
        return (x.numel() // c if c else 0), c, 1
    c = x.shape[1]
    return x.shape[0], c, (x.numel() // (x.shape[0] * c) if x.shape[0] * c else 0)


def _dyt_tile(x: Tensor, c: int, length: int) -> tuple[int, int]:
    bc, bl, _ = tile(x, c, length, False)
    return bc, bl


def dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool) -> Tensor:
    """DyT forward on a contiguous ``x`` (channels last: affine over the last dim, else over dim 1)."""
    r, c, length = _dyt_view(x, channels_last)
    _, acc_tl = _acc(x.dtype)
    bc, bl = _dyt_tile(x, c, length)
    lblocks = triton.cdiv(length, bl) if length else 0
    y = torch.empty_like(x)
    if r * lblocks and x.numel():
        kernel("dyt_fwd", x)[(r * lblocks,)](
            x, alpha, weight if weight is not None else x, bias if bias is not None else x, y, c, length, lblocks,
            ACC=acc_tl, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=bc, BLOCK_L=bl,
            num_warps=num_warps(bc * bl),
        )
    return y


def dyt_backward(
    g: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channels_last: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(∂x, ∂α, ∂w, ∂b)`` of :func:`dyt_forward` (∂α, ∂w, ∂b in the accumulation dtype, flat)."""
    r, c, length = _dyt_view(x, channels_last)
    acc, acc_tl = _acc(x.dtype)
    g = g.contiguous()
    bc, bl = _dyt_tile(x, c, length)
    lblocks = triton.cdiv(length, bl) if length else 0
    units = r * lblocks
    progs = _programs(x, units)
    per = triton.cdiv(units, progs) if units else 0
    reg = bc >= c
    alloc = torch.empty if reg else torch.zeros
    pa = torch.zeros((progs, 1), dtype=acc, device=x.device)
    pw = alloc((progs, c), dtype=acc, device=x.device) if want_w else None
    pb = alloc((progs, c), dtype=acc, device=x.device) if want_b else None
    dx = torch.empty_like(x)
    if units and x.numel():
        kernel("dyt_bwd", x)[(progs,)](
            g, x, alpha, weight if weight is not None else x, dx, pa,
            pw if pw is not None else pa, pb if pb is not None else pa, c, length, lblocks, units, per,
            ACC=acc_tl, HAS_W=weight is not None, WANT_W=want_w, WANT_B=want_b, REG_ACC=reg,
            BLOCK_C=bc, BLOCK_L=bl, num_warps=num_warps(bc * bl),
        )
    elif pw is not None or pb is not None:
        pw = None if pw is None else pw.zero_()
        pb = None if pb is None else pb.zero_()
    da = _column_sums(pa, x)
    dw = None if pw is None else _column_sums(pw, x)
    db = None if pb is None else _column_sums(pb, x)
    return dx, da, dw, db

