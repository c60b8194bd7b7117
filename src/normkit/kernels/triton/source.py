"""The Triton kernels' source, as plain functions: :mod:`normkit.kernels.triton.launch` compiles them
(``triton.jit``) or wraps them for the interpreter (``TRITON_INTERPRET=1``), whichever a call needs.

Why plain functions and not ``@triton.jit`` here: Triton decides between compiling and interpreting
when a function is decorated, from ``TRITON_INTERPRET``; :mod:`~normkit.kernels.triton.launch` decorates
a kernel when a call first needs it and says clearly when the process cannot interpret. The device
functions the kernels share (tile offsets, loads, the backward's ∂x, partial sums) are decorated here,
at import, by :func:`_device_function`, the same way as Triton's own library (``tl.sum``): a kernel
can only call helpers of its own kind, and Triton fixes the kind of its library when imported.

One kernel per job, not one per norm. Every statistics norm arrives in normkit's canonical
``(N, G, Cg, L)`` view (:mod:`normkit.kernels.canonical`), contiguous, element
``(n, g, c, l)`` at ``((n·G + g)·Cg + c)·L + l``, affine indexed by ``g·Cg + c``:

* ``SEG=False`` (statistics per position, reduced over ``Cg``): LayerNorm/RMSNorm rows
  (``G = 1, L = 1``), per-head rows with a 2-D weight (``G = heads, L = 1``), channels-first
  LayerNorm2d/RMSNorm2d (``G = 1, L = H·W``). A program takes one ``(n, g)`` and ``BLOCK_L``
  positions.
* ``SEG=True`` (statistics per segment, reduced over ``Cg`` and ``L``): GroupNorm (``G`` groups),
  InstanceNorm (``G = C, Cg = 1``). A program takes one ``(n, g)`` segment.

A program loads ``[BLOCK_C, BLOCK_L]`` tiles; ``SINGLE`` (the whole reduction fits one tile) keeps
it in registers: one read of x, one write of y. Otherwise it loops over tiles: a pass for the mean
(LayerNorm), one for Σ(x − μ)² (not Σx² − μ², which cancels), one for the output. Statistics are
accumulated in ``ACC`` (float32, float64 for float64 input). The sums are kept per lane
(``[BLOCK_L]``) and, with ``SEG``, totalled and broadcast back, so the same code serves both.

Backward (``norm_bwd``), with ĝ = ∂L/∂y · w, x̂ = (x − μ)·r and means over the reduced set::

    ∂L/∂x = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂))        (no mean(ĝ) term for RMSNorm)

Each program owns a contiguous range of units (rows or segments) and writes its sums of
``∂L/∂y · x̂`` and ``∂L/∂y`` per weight element into its own row of a float32 (float64) partial
buffer — in registers when its tiles cover the whole weight (``REG_ACC``), else read-add-write on
its own row — and ``partial_sum`` adds the rows in a fixed order. No atomics: bitwise reproducible.
"""

from __future__ import annotations

from typing import Any

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def _device_function(fn: Any) -> Any:
    """``fn`` as a Triton device function: interpreted where Triton's library was imported for the
    interpreter (``TRITON_INTERPRET=1`` at its import; :func:`launch.imported_for_interpreter`), else
    compiled (``triton.jit``). The kernels below call these helpers; Triton inlines them when compiling."""
    if isinstance(tl.standard.zeros, InterpretedFunction):
        return InterpretedFunction(fn)
    return JITFunction(fn)


@_device_function
def unit_layout(unit, n_lblocks, G, Cg, L, ls, SEG: tl.constexpr, BLOCK_L: tl.constexpr):  # noqa: N803
    """Where work unit ``unit`` lies: one ``(n, g)`` segment (``SEG``) or ``BLOCK_L`` positions of one ``(n, g)``.

    Returns ``(g, base, l_lo, l_hi, st_off, st_lanes)``: the group, the offset of the ``(n, g)`` block, the
    positions ``[l_lo, l_hi)``, and the offsets and valid lanes of the per-lane statistics (with ``SEG``
    every lane addresses the segment's one value).
    """
    seg = unit // n_lblocks
    g = seg % G
    base = tl.cast(seg, tl.int64) * Cg * L
    if SEG:
        l_lo = 0
        l_hi = L
        st_off = tl.cast(seg, tl.int64) + ls * 0
        st_lanes = ls < BLOCK_L
    else:
        l_lo = (unit % n_lblocks) * BLOCK_L
        l_hi = l_lo + BLOCK_L
        st_off = tl.cast(seg, tl.int64) * L + l_lo + ls
        st_lanes = (l_lo + ls) < L
    return g, base, l_lo, l_hi, st_off, st_lanes


@_device_function
def program_units(pid, units_per_prog, n_units):
    """The contiguous range ``[u_lo, u_hi)`` of work units a backward program owns."""
    u_lo = pid * units_per_prog
    return u_lo, tl.minimum(u_lo + units_per_prog, n_units)


@_device_function
def tile_at(base, c, l0, ls, C, L):  # noqa: N803
    """Offsets and in-bounds mask of the ``[BLOCK_C, BLOCK_L]`` tile of channels ``c`` and positions
    ``l0 + ls`` in the ``(C, L)`` block starting at ``base``."""
    lpos = l0 + ls
    mask = (c[:, None] < C) & (lpos[None, :] < L)
    offs = base + c[:, None] * L + lpos[None, :]
    return offs, mask


@_device_function
def load_channels(P, off, c, C, ACC: tl.constexpr, PRESENT: tl.constexpr):  # noqa: N803
    """``P[off + c]`` for the channels ``c < C`` (an affine weight or bias), in ``ACC``. Without the
    parameter (``not PRESENT``) zeros, which the callers' ``HAS_W``/``HAS_B`` branches never read."""
    if PRESENT:
        v = tl.load(P + off + c, mask=c < C, other=0.0).to(ACC)
    else:
        v = tl.zeros_like(c).to(ACC)
    return v


@_device_function
def apply_affine(y, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):  # noqa: N803
    """``y · w + b`` per channel (the tile's rows), each part only where the layer has it."""
    if HAS_W:
        y = y * w[:, None]
    if HAS_B:
        y = y + b[:, None]
    return y


@_device_function
def load_input(X, R, S, offs, mask, ACC: tl.constexpr, HAS_R: tl.constexpr, WRITE_SUM: tl.constexpr):  # noqa: N803
    """A tile of the norm's input in ``ACC``: ``x``, or with a residual ``x + r`` rounded to the sum's
    dtype (what the fused add + norm returns and normalizes), stored to ``S`` when ``WRITE_SUM``."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_R:
        x = (x.to(ACC) + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
        if WRITE_SUM:
            tl.store(S + offs, x, mask=mask)
    return x.to(ACC)


@_device_function
def lane_total(v, zero_l, SEG: tl.constexpr):  # noqa: N803
    """Per-lane sums as sums over the reduced set: unchanged for rows (each lane is its own reduction),
    totalled over the lanes and broadcast back to every lane with ``SEG`` (the lanes share one segment)."""
    if SEG:
        v = zero_l + tl.sum(v, 0)
    return v


@_device_function
def grad_tile(S, DY, offs, mask, mean, rstd, w, ACC: tl.constexpr, HAS_W: tl.constexpr):  # noqa: N803
    """The backward's view of one tile: ``(dy, x̂, ĝ)`` with ``x̂ = (x − μ)·r`` (0 outside the mask) and
    ``ĝ = dy · w`` (``dy`` without a weight)."""
    x = tl.load(S + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    if HAS_W:
        wdy = dy * w[:, None]
    else:
        wdy = dy
    return dy, xhat, wdy


@_device_function
def store_dx(DX, GS, offs, mask, wdy, xhat, c1, c2, rstd, ACC: tl.constexpr, CENTER: tl.constexpr,  # noqa: N803
             HAS_GS: tl.constexpr):  # noqa: N803
    """``∂x = r · (ĝ − x̂ · c1 − c2)`` with ``c1 = mean(ĝ · x̂)``, ``c2 = mean(ĝ)`` (no ``c2`` term for
    RMSNorm), plus the gradient arriving at the residual sum (``GS``), written to ``DX``."""
    dx = wdy - xhat * c1[None, :]
    if CENTER:
        dx = dx - c2[None, :]
    dx = dx * rstd[None, :]
    if HAS_GS:
        dx = dx + tl.load(GS + offs, mask=mask, other=0.0).to(ACC)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@_device_function
def add_to_partial(P, off, c, C, value):  # noqa: N803
    """``P[off + c] += value`` for the channels ``c < C``: the program's own row of a partial-sum buffer
    (no other program writes it, hence no atomics)."""
    p = P + off + c
    tl.store(p, tl.load(p, mask=c < C, other=0.0) + value, mask=c < C)


@_device_function
def accumulate_partial(acc, P, off, c, C, value, REG_ACC: tl.constexpr):  # noqa: N803
    """Add a tile's per-channel sums ``value`` to the program's partial row: in registers (``acc``,
    returned) when ``REG_ACC`` (the tile covers the whole weight), else in ``P`` (:func:`add_to_partial`)."""
    if REG_ACC:
        acc += value
    else:
        add_to_partial(P, off, c, C, value)
    return acc


@_device_function
def store_register_partials(PW, PB, prow, cs, K, acc_w, acc_b, WANT_W: tl.constexpr, WANT_B: tl.constexpr):  # noqa: N803
    """Write the partial ∂w/∂b sums a program kept in registers (``REG_ACC``) to its rows."""
    if WANT_W:
        tl.store(PW + prow + cs, acc_w, mask=cs < K)
    if WANT_B:
        tl.store(PB + prow + cs, acc_b, mask=cs < K)


def norm_fwd(
    X, R, S, Y, W, B, MEAN, VAR, RSTD,  # noqa: N803 - pointers, Triton's convention
    Cg, L, G, n_lblocks, n_red, eps,  # noqa: N803
    ACC: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # noqa: N803
    CENTER: tl.constexpr, SEG: tl.constexpr, SINGLE: tl.constexpr,  # noqa: N803
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # noqa: N803
):
    cs = tl.arange(0, BLOCK_C)
    ls = tl.arange(0, BLOCK_L)
    zero_l = tl.zeros([BLOCK_L], ACC)
    g, base, l_lo, l_hi, st_off, st_mask = unit_layout(tl.program_id(0), n_lblocks, G, Cg, L, ls, SEG, BLOCK_L)
    if SEG:
        st_mask = ls == 0  # every lane holds the segment's statistics: one stores them
    if SINGLE:
        offs, mask = tile_at(base, cs, l_lo, ls, Cg, L)
        x = load_input(X, R, S, offs, mask, ACC, HAS_R, True)
        if CENTER:
            mean = lane_total(tl.sum(x, 0), zero_l, SEG) / n_red
            d = tl.where(mask, x - mean[None, :], 0.0)
        else:
            mean = zero_l
            d = x
        var = lane_total(tl.sum(d * d, 0), zero_l, SEG) / n_red
        rstd = tl.rsqrt(var + eps)
        w = load_channels(W, g * Cg, cs, Cg, ACC, HAS_W)
        b = load_channels(B, g * Cg, cs, Cg, ACC, HAS_B)
        y = apply_affine(d * rstd[None, :], w, b, HAS_W, HAS_B)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: Σx (LayerNorm) or Σx² (RMSNorm); with a residual, the sum is written here
        acc = zero_l
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + cs
            for l0 in range(l_lo, l_hi, BLOCK_L):
                offs, mask = tile_at(base, c, l0, ls, Cg, L)
                x = load_input(X, R, S, offs, mask, ACC, HAS_R, True)
                if CENTER:
                    acc += tl.sum(x, 0)
                else:
                    acc += tl.sum(x * x, 0)
        acc = lane_total(acc, zero_l, SEG)
        if CENTER:
            mean = acc / n_red
            acc2 = zero_l
            for c0 in range(0, Cg, BLOCK_C):
                c = c0 + cs
                for l0 in range(l_lo, l_hi, BLOCK_L):
                    offs, mask = tile_at(base, c, l0, ls, Cg, L)
                    # x + r again (not read back from S: another thread may have written it)
                    x = load_input(X, R, S, offs, mask, ACC, HAS_R, False)
                    d = tl.where(mask, x - mean[None, :], 0.0)
                    acc2 += tl.sum(d * d, 0)
            var = lane_total(acc2, zero_l, SEG) / n_red
        else:
            mean = zero_l
            var = acc / n_red
        rstd = tl.rsqrt(var + eps)
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + cs
            w = load_channels(W, g * Cg, c, Cg, ACC, HAS_W)
            b = load_channels(B, g * Cg, c, Cg, ACC, HAS_B)
            for l0 in range(l_lo, l_hi, BLOCK_L):
                offs, mask = tile_at(base, c, l0, ls, Cg, L)
                x = load_input(X, R, S, offs, mask, ACC, HAS_R, False)
                y = apply_affine((x - mean[None, :]) * rstd[None, :], w, b, HAS_W, HAS_B)
                tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + st_off, mean, mask=st_mask)
    tl.store(VAR + st_off, var, mask=st_mask)
    tl.store(RSTD + st_off, rstd, mask=st_mask)


def norm_bwd(
    DY, GS, S, W, MEAN, RSTD, DX, PW, PB,  # noqa: N803
    Cg, L, G, n_lblocks, n_units, units_per_prog, K, n_red,  # noqa: N803
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_GS: tl.constexpr, CENTER: tl.constexpr,  # noqa: N803
    SEG: tl.constexpr, SINGLE: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr,  # noqa: N803
    REG_ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # noqa: N803
):
    pid = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    ls = tl.arange(0, BLOCK_L)
    zero_l = tl.zeros([BLOCK_L], ACC)
    acc_w = tl.zeros([BLOCK_C], ACC)
    acc_b = tl.zeros([BLOCK_C], ACC)
    prow = tl.cast(pid, tl.int64) * K
    u_lo, u_hi = program_units(pid, units_per_prog, n_units)
    for u in range(u_lo, u_hi):
        g, base, l_lo, l_hi, st_off, st_mask = unit_layout(u, n_lblocks, G, Cg, L, ls, SEG, BLOCK_L)
        mean = tl.load(MEAN + st_off, mask=st_mask, other=0.0)
        rstd = tl.load(RSTD + st_off, mask=st_mask, other=0.0)
        if SINGLE:
            offs, mask = tile_at(base, cs, l_lo, ls, Cg, L)
            w = load_channels(W, g * Cg, cs, Cg, ACC, HAS_W)
            dy, xhat, wdy = grad_tile(S, DY, offs, mask, mean, rstd, w, ACC, HAS_W)
            c1 = lane_total(tl.sum(xhat * wdy, 0), zero_l, SEG) / n_red
            c2 = lane_total(tl.sum(wdy, 0), zero_l, SEG) / n_red
            store_dx(DX, GS, offs, mask, wdy, xhat, c1, c2, rstd, ACC, CENTER, HAS_GS)
            if WANT_W:
                acc_w = accumulate_partial(acc_w, PW + prow, g * Cg, cs, Cg, tl.sum(dy * xhat, 1), REG_ACC)
            if WANT_B:
                acc_b = accumulate_partial(acc_b, PB + prow, g * Cg, cs, Cg, tl.sum(dy, 1), REG_ACC)
        else:
            c1 = zero_l
            c2 = zero_l
            for c0 in range(0, Cg, BLOCK_C):
                c = c0 + cs
                w = load_channels(W, g * Cg, c, Cg, ACC, HAS_W)
                for l0 in range(l_lo, l_hi, BLOCK_L):
                    offs, mask = tile_at(base, c, l0, ls, Cg, L)
                    dy, xhat, wdy = grad_tile(S, DY, offs, mask, mean, rstd, w, ACC, HAS_W)
                    c1 += tl.sum(xhat * wdy, 0)
                    c2 += tl.sum(wdy, 0)
            c1 = lane_total(c1, zero_l, SEG) / n_red
            c2 = lane_total(c2, zero_l, SEG) / n_red
            for c0 in range(0, Cg, BLOCK_C):
                c = c0 + cs
                w = load_channels(W, g * Cg, c, Cg, ACC, HAS_W)
                pw = tl.zeros([BLOCK_C], ACC)
                pb = tl.zeros([BLOCK_C], ACC)
                for l0 in range(l_lo, l_hi, BLOCK_L):
                    offs, mask = tile_at(base, c, l0, ls, Cg, L)
                    dy, xhat, wdy = grad_tile(S, DY, offs, mask, mean, rstd, w, ACC, HAS_W)
                    store_dx(DX, GS, offs, mask, wdy, xhat, c1, c2, rstd, ACC, CENTER, HAS_GS)
                    pw += tl.sum(dy * xhat, 1)
                    pb += tl.sum(dy, 1)
                if WANT_W:
                    add_to_partial(PW + prow, g * Cg, c, Cg, pw)
                if WANT_B:
                    add_to_partial(PB + prow, g * Cg, c, Cg, pb)
    if REG_ACC:
        store_register_partials(PW, PB, prow, cs, K, acc_w, acc_b, WANT_W, WANT_B)


def partial_sum(P, OUT, n_rows, K, BLOCK: tl.constexpr):  # noqa: N803
    """``OUT[k] = Σ_i P[i, k]``, rows added in order (the deterministic second reduction)."""
    pid = tl.program_id(0)
    k = pid * BLOCK + tl.arange(0, BLOCK)
    m = k < K
    acc = tl.zeros([BLOCK], OUT.dtype.element_ty)
    for i in range(0, n_rows):
        acc += tl.load(P + tl.cast(i, tl.int64) * K + k, mask=m, other=0.0)
    tl.store(OUT + k, acc, mask=m)


def dyt_fwd(
    X, A, W, B, Y, C, L, n_lblocks,  # noqa: N803
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # noqa: N803
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # noqa: N803
):
    """DyT ``y = w · tanh(α x) + b`` on an ``(R, C, L)`` view, affine indexed by c.

    tanh as ``sign(z) · (1 − e) / (1 + e)`` with ``e = exp(−2|z|)``: no overflow, exact saturation.
    """
    pid = tl.program_id(0)
    base = tl.cast(pid // n_lblocks, tl.int64) * C * L
    l0 = (pid % n_lblocks) * BLOCK_L
    alpha = tl.load(A).to(ACC)
    cs = tl.arange(0, BLOCK_C)
    ls = tl.arange(0, BLOCK_L)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        offs, mask = tile_at(base, c, l0, ls, C, L)
        z = alpha * tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        w = load_channels(W, 0, c, C, ACC, HAS_W)
        b = load_channels(B, 0, c, C, ACC, HAS_B)
        y = apply_affine(tl.where(z < 0, -t, t), w, b, HAS_W, HAS_B)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def dyt_bwd(
    DY, X, A, W, DX, PA, PW, PB, C, L, n_lblocks, n_units, units_per_prog,  # noqa: N803
    ACC: tl.constexpr, HAS_W: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr,  # noqa: N803
    REG_ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # noqa: N803
):
    """DyT backward, t recomputed: ``∂x = α·w·(1 − t²)·ĝ``, ``∂α = Σ w·(1 − t²)·x·ĝ``, ``∂w = Σ ĝ·t``,
    ``∂b = Σ ĝ``, with ``1 − t² = 4e / (1 + e)²`` (no cancellation where t ≈ ±1); per-program
    partial sums as in ``norm_bwd``."""
    pid = tl.program_id(0)
    alpha = tl.load(A).to(ACC)
    cs = tl.arange(0, BLOCK_C)
    ls = tl.arange(0, BLOCK_L)
    acc_a = tl.zeros([BLOCK_L], ACC)
    acc_w = tl.zeros([BLOCK_C], ACC)
    acc_b = tl.zeros([BLOCK_C], ACC)
    prow = tl.cast(pid, tl.int64) * C
    u_lo, u_hi = program_units(pid, units_per_prog, n_units)
    for u in range(u_lo, u_hi):
        base = tl.cast(u // n_lblocks, tl.int64) * C * L
        l0 = (u % n_lblocks) * BLOCK_L
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            offs, mask = tile_at(base, c, l0, ls, C, L)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
            z = alpha * x
            e = tl.exp(-2.0 * tl.abs(z))
            q = 1.0 / (1.0 + e)
            sech2 = 4.0 * e * q * q
            if HAS_W:
                wdy = dy * load_channels(W, 0, c, C, ACC, HAS_W)[:, None]
            else:
                wdy = dy
            dpre = wdy * sech2
            tl.store(DX + offs, (dpre * alpha).to(DX.dtype.element_ty), mask=mask)
            acc_a += tl.sum(dpre * x, 0)
            if WANT_W:
                t = (1.0 - e) * q
                acc_w = accumulate_partial(acc_w, PW, prow, c, C, tl.sum(dy * tl.where(z < 0, -t, t), 1), REG_ACC)
            if WANT_B:
                acc_b = accumulate_partial(acc_b, PB, prow, c, C, tl.sum(dy, 1), REG_ACC)
    tl.store(PA + pid, tl.sum(acc_a, 0))
    if REG_ACC:
        store_register_partials(PW, PB, prow, cs, C, acc_w, acc_b, WANT_W, WANT_B)
