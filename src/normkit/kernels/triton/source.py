"""The Triton kernels' source, as plain functions: :mod:`normkit.kernels.triton.launch` compiles them
(``triton.jit``) or wraps them for the interpreter (``TRITON_INTERPRET=1``), whichever a call needs.

Why plain functions and not ``@triton.jit`` here: Triton decides between compiling and interpreting
when a function is decorated, from ``TRITON_INTERPRET``. Decorating lazily per mode lets the same
process run the kernels on CUDA tensors and, with the variable set, on CPU tensors (the test suite).

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

import triton.language as tl


def norm_fwd(
    X, R, S, Y, W, B, MEAN, VAR, RSTD,  # noqa: N803 - pointers, Triton's convention
    Cg, L, G, n_lblocks, n_red, eps,  # noqa: N803
    ACC: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # noqa: N803
    CENTER: tl.constexpr, SEG: tl.constexpr, SINGLE: tl.constexpr,  # noqa: N803
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,  # noqa: N803
):
    pid = tl.program_id(0)
    seg = pid // n_lblocks
    lb = pid % n_lblocks
    g = seg % G
    base = tl.cast(seg, tl.int64) * Cg * L
    cs = tl.arange(0, BLOCK_C)
    ls = tl.arange(0, BLOCK_L)
    zero_l = tl.zeros([BLOCK_L], ACC)
    if SEG:
        l_lo = 0
        l_hi = L
        st_off = tl.cast(seg, tl.int64) + ls * 0
        st_mask = ls == 0
    else:
        l_lo = lb * BLOCK_L
        l_hi = l_lo + BLOCK_L
        st_off = tl.cast(seg, tl.int64) * L + l_lo + ls
        st_mask = (l_lo + ls) < L
    if SINGLE:
        c = cs
        lpos = l_lo + ls
        mask = (c[:, None] < Cg) & (lpos[None, :] < L)
        offs = base + c[:, None] * L + lpos[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0)
        if HAS_R:
            x = (x.to(ACC) + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
            tl.store(S + offs, x, mask=mask)
        x = x.to(ACC)
        if CENTER:
            m = tl.sum(x, 0)
            if SEG:
                m = zero_l + tl.sum(m, 0)
            mean = m / n_red
            d = tl.where(mask, x - mean[None, :], 0.0)
        else:
            mean = zero_l
            d = x
        v = tl.sum(d * d, 0)
        if SEG:
            v = zero_l + tl.sum(v, 0)
        var = v / n_red
        rstd = tl.rsqrt(var + eps)
        y = d * rstd[None, :]
        if HAS_W:
            w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
            y = y * w[:, None]
        if HAS_B:
            b = tl.load(B + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
            y = y + b[:, None]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: Σx (LayerNorm) or Σx² (RMSNorm); with a residual, the sum is written here
        acc = zero_l
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + cs
            for l0 in range(l_lo, l_hi, BLOCK_L):
                lpos = l0 + ls
                mask = (c[:, None] < Cg) & (lpos[None, :] < L)
                offs = base + c[:, None] * L + lpos[None, :]
                x = tl.load(X + offs, mask=mask, other=0.0)
                if HAS_R:
                    x = (x.to(ACC) + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
                    tl.store(S + offs, x, mask=mask)
                x = x.to(ACC)
                if CENTER:
                    acc += tl.sum(x, 0)
                else:
                    acc += tl.sum(x * x, 0)
        if SEG:
            acc = zero_l + tl.sum(acc, 0)
        if CENTER:
            mean = acc / n_red
            acc2 = zero_l
            for c0 in range(0, Cg, BLOCK_C):
                c = c0 + cs
                for l0 in range(l_lo, l_hi, BLOCK_L):
                    lpos = l0 + ls
                    mask = (c[:, None] < Cg) & (lpos[None, :] < L)
                    offs = base + c[:, None] * L + lpos[None, :]
                    x = tl.load(X + offs, mask=mask, other=0.0)
                    if HAS_R:  # x + r again (not read back from S: another thread may have written it)
                        x = (x.to(ACC) + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
                    x = x.to(ACC)
                    d = tl.where(mask, x - mean[None, :], 0.0)
                    acc2 += tl.sum(d * d, 0)
            if SEG:
                acc2 = zero_l + tl.sum(acc2, 0)
            var = acc2 / n_red
        else:
            mean = zero_l
            var = acc / n_red
        rstd = tl.rsqrt(var + eps)
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + cs
            if HAS_W:
                w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
            if HAS_B:
                b = tl.load(B + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
            for l0 in range(l_lo, l_hi, BLOCK_L):
                lpos = l0 + ls
                mask = (c[:, None] < Cg) & (lpos[None, :] < L)
                offs = base + c[:, None] * L + lpos[None, :]
                x = tl.load(X + offs, mask=mask, other=0.0)
                if HAS_R:
                    x = (x.to(ACC) + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
                x = x.to(ACC)
                y = (x - mean[None, :]) * rstd[None, :]
                if HAS_W:
                    y = y * w[:, None]
                if HAS_B:
                    y = y + b[:, None]
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
    u_lo = pid * units_per_prog
    u_hi = tl.minimum(u_lo + units_per_prog, n_units)
    for u in range(u_lo, u_hi):
        seg = u // n_lblocks
        lb = u % n_lblocks
        g = seg % G
        base = tl.cast(seg, tl.int64) * Cg * L
        if SEG:
            l_lo = 0
            l_hi = L
            st_off = tl.cast(seg, tl.int64) + ls * 0
            st_mask = ls < BLOCK_L
        else:
            l_lo = lb * BLOCK_L
            l_hi = l_lo + BLOCK_L
            st_off = tl.cast(seg, tl.int64) * L + l_lo + ls
            st_mask = (l_lo + ls) < L
        mean = tl.load(MEAN + st_off, mask=st_mask, other=0.0)
        rstd = tl.load(RSTD + st_off, mask=st_mask, other=0.0)
        if SINGLE:
            c = cs
            lpos = l_lo + ls
            mask = (c[:, None] < Cg) & (lpos[None, :] < L)
            offs = base + c[:, None] * L + lpos[None, :]
            x = tl.load(S + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            if HAS_W:
                w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
                wdy = dy * w[:, None]
            else:
                wdy = dy
            c1 = tl.sum(xhat * wdy, 0)
            if SEG:
                c1 = zero_l + tl.sum(c1, 0)
            dx = wdy - xhat * (c1 / n_red)[None, :]
            if CENTER:
                c2 = tl.sum(wdy, 0)
                if SEG:
                    c2 = zero_l + tl.sum(c2, 0)
                dx = dx - (c2 / n_red)[None, :]
            dx = dx * rstd[None, :]
            if HAS_GS:
                dx = dx + tl.load(GS + offs, mask=mask, other=0.0).to(ACC)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if WANT_W:
                pw = tl.sum(dy * xhat, 1)
                if REG_ACC:
                    acc_w += pw
                else:
                    p = PW + prow + g * Cg + c
                    tl.store(p, tl.load(p, mask=c < Cg, other=0.0) + pw, mask=c < Cg)
            if WANT_B:
                pb = tl.sum(dy, 1)
                if REG_ACC:
                    acc_b += pb
                else:
                    p = PB + prow + g * Cg + c
                    tl.store(p, tl.load(p, mask=c < Cg, other=0.0) + pb, mask=c < Cg)
        else:
            c1 = zero_l
            c2 = zero_l
            for c0 in range(0, Cg, BLOCK_C):
                c = c0 + cs
                if HAS_W:
                    w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
                for l0 in range(l_lo, l_hi, BLOCK_L):
                    lpos = l0 + ls
                    mask = (c[:, None] < Cg) & (lpos[None, :] < L)
                    offs = base + c[:, None] * L + lpos[None, :]
                    x = tl.load(S + offs, mask=mask, other=0.0).to(ACC)
                    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
                    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
                    if HAS_W:
                        wdy = dy * w[:, None]
                    else:
                        wdy = dy
                    c1 += tl.sum(xhat * wdy, 0)
                    c2 += tl.sum(wdy, 0)
            if SEG:
                c1 = zero_l + tl.sum(c1, 0)
                c2 = zero_l + tl.sum(c2, 0)
            c1 = c1 / n_red
            c2 = c2 / n_red
            for c0 in range(0, Cg, BLOCK_C):
                c = c0 + cs
                if HAS_W:
                    w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(ACC)
                pw = tl.zeros([BLOCK_C], ACC)
                pb = tl.zeros([BLOCK_C], ACC)
                for l0 in range(l_lo, l_hi, BLOCK_L):
                    lpos = l0 + ls
                    mask = (c[:, None] < Cg) & (lpos[None, :] < L)
                    offs = base + c[:, None] * L + lpos[None, :]
                    x = tl.load(S + offs, mask=mask, other=0.0).to(ACC)
                    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
                    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
                    if HAS_W:
                        wdy = dy * w[:, None]
                    else:
                        wdy = dy
                    dx = wdy - xhat * c1[None, :]
                    if CENTER:
                        dx = dx - c2[None, :]
                    dx = dx * rstd[None, :]
                    if HAS_GS:
                        dx = dx + tl.load(GS + offs, mask=mask, other=0.0).to(ACC)
                    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
                    pw += tl.sum(dy * xhat, 1)
                    pb += tl.sum(dy, 1)
                if WANT_W:
                    p = PW + prow + g * Cg + c
                    tl.store(p, tl.load(p, mask=c < Cg, other=0.0) + pw, mask=c < Cg)
                if WANT_B:
                    p = PB + prow + g * Cg + c
                    tl.store(p, tl.load(p, mask=c < Cg, other=0.0) + pb, mask=c < Cg)
    if REG_ACC:
        if WANT_W:
            tl.store(PW + prow + cs, acc_w, mask=cs < K)
        if WANT_B:
            tl.store(PB + prow + cs, acc_b, mask=cs < K)


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
    r = pid // n_lblocks
    lb = pid % n_lblocks
    base = tl.cast(r, tl.int64) * C * L
    alpha = tl.load(A).to(ACC)
    cs = tl.arange(0, BLOCK_C)
    lpos = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c[:, None] < C) & (lpos[None, :] < L)
        offs = base + c[:, None] * L + lpos[None, :]
        z = alpha * tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        y = tl.where(z < 0, -t, t)
        if HAS_W:
            y = y * tl.load(W + c, mask=c < C, other=0.0).to(ACC)[:, None]
        if HAS_B:
            y = y + tl.load(B + c, mask=c < C, other=0.0).to(ACC)[:, None]
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
    u_lo = pid * units_per_prog
    u_hi = tl.minimum(u_lo + units_per_prog, n_units)
    for u in range(u_lo, u_hi):
        r = u // n_lblocks
        lb = u % n_lblocks
        base = tl.cast(r, tl.int64) * C * L
        lpos = lb * BLOCK_L + ls
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            mask = (c[:, None] < C) & (lpos[None, :] < L)
            offs = base + c[:, None] * L + lpos[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
            z = alpha * x
            e = tl.exp(-2.0 * tl.abs(z))
            q = 1.0 / (1.0 + e)
            sech2 = 4.0 * e * q * q
            if HAS_W:
                wdy = dy * tl.load(W + c, mask=c < C, other=0.0).to(ACC)[:, None]
            else:
                wdy = dy
            dpre = wdy * sech2
            tl.store(DX + offs, (dpre * alpha).to(DX.dtype.element_ty), mask=mask)
            acc_a += tl.sum(dpre * x, 0)
            if WANT_W:
                t = (1.0 - e) * q
                pw = tl.sum(dy * tl.where(z < 0, -t, t), 1)
                if REG_ACC:
                    acc_w += pw
                else:
                    p = PW + prow + c
                    tl.store(p, tl.load(p, mask=c < C, other=0.0) + pw, mask=c < C)
            if WANT_B:
                pb = tl.sum(dy, 1)
                if REG_ACC:
                    acc_b += pb
                else:
                    p = PB + prow + c
                    tl.store(p, tl.load(p, mask=c < C, other=0.0) + pb, mask=c < C)
    tl.store(PA + pid, tl.sum(acc_a, 0))
    if REG_ACC:
        if WANT_W:
            tl.store(PW + prow + cs, acc_w, mask=cs < C)
        if WANT_B:
            tl.store(PB + prow + cs, acc_b, mask=cs < C)
