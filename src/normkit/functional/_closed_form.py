"""Plumbing shared by the closed-form autograd functions of the norm-activation layers.

EvoNorm-B0/S0, FRN(+TLU) and GRN are a statistics norm plus per-element work that no ATen op
fuses. Their default path (backend ``"auto"``, also ``"native"`` and ``"kernels"``) is one
``torch.autograd.Function`` each with a closed-form backward that saves only the input plus
O(N·C) statistics (FRN's TLU adds its 0/1 mask) and recomputes elementwise intermediates;
``"eager"`` keeps the plain formula as the reference path, ``"compiled"``/``"inductor"`` compile
that formula, and inside a user's ``torch.compile`` the plain formula is traced (the user's
compiler fuses it with its neighbours, as before).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normkit import backend as _backend

_FAST_DTYPES = (torch.float32, torch.float64)
#: below this many input elements ``"auto"`` runs the plain formula: a closed-form call costs a few ms of
#: Python and dispatch (EvoNorm-B0/S0 at 4×16×8×8 on the 2-core machine: ~6 ms fwd+bwd against 1–2 ms for
#: the plain formula), which only larger inputs pay back (16×64×28×28: 0.2–0.8× the plain formula's time).
#: ``"kernels"`` / ``"native"`` take the closed form at any size.
FAST_MIN_NUMEL = 1 << 16


def route(backend: str | None, x: Tensor, op: str, stats_dtype: torch.dtype | None) -> str:
    """``"fast"`` (the closed-form function), ``"eager"`` (the plain formula) or ``"compiled"``/``"inductor"``.

    The fast path needs a contiguous float32/float64 input with no ``stats_dtype`` override
    (half inputs accumulate in float32 through the plain formula) and is skipped under a
    compiler, for empty inputs, on ``"auto"`` below :data:`FAST_MIN_NUMEL` elements, and when the
    caller names ``backend="eager"``.
    """
    impl = _backend.resolve(backend, x, op)  # records the call; raises for an unusable "triton"
    if impl in ("compiled", "inductor"):
        return impl
    name = _backend.get_backend() if backend is None else backend
    if (
        name == "eager"
        or torch.compiler.is_compiling()
        or x.dtype not in _FAST_DTYPES
        or (stats_dtype is not None and stats_dtype != x.dtype)
        or not x.is_contiguous()
        or x.numel() == 0
        or (name == "auto" and x.numel() < FAST_MIN_NUMEL)
    ):
        return "eager"
    return "fast"


def affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool = False) -> Tensor:
    """``y · γ + β`` with per-channel ``(C,)`` parameters (None: γ = 1 / β = 0), for ``(N, C, *)``
    input or, with ``channels_last``, ``(N, *, C)``."""
    shape = (-1,) if channels_last else (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape).to(y.dtype)
    if bias is not None:
        y = y + bias.reshape(shape).to(y.dtype)
    return y


def nc_view(p: Tensor | None, x: Tensor) -> Tensor | None:
    """A ``(C,)`` parameter (or ``(N, C)`` statistic) shaped to broadcast against ``(N, C, *)`` ``x``."""
    if p is None:
        return None
    lead = (1, -1) if p.dim() <= 1 else tuple(p.shape[:2])
    return p.reshape(lead + (1,) * (x.dim() - 2))


def rows(t: Tensor) -> Tensor:
    """``(N, C, *)`` as ``(N·C, L)`` (a view of a contiguous tensor)."""
    return t.reshape(t.shape[0] * t.shape[1], -1) if t.numel() else t.reshape(t.shape[0] * t.shape[1], 0)


def nc_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_L a·b`` for every (sample, channel) of two contiguous ``(N, C, *)`` tensors, shaped (N, C).

    A batched matrix-vector product: one read of each input, no input-sized temporary.
    """
    n, c = a.shape[:2]
    return torch.bmm(rows(a).unsqueeze(1), rows(b).unsqueeze(2)).reshape(n, c)


def nc_sum(a: Tensor) -> Tensor:
    """``Σ_L a`` for every (sample, channel) of a contiguous ``(N, C, *)`` tensor, shaped (N, C)."""
    return rows(a).sum(1).reshape(a.shape[:2])


def param_grad(t: Tensor | None, p: Tensor | None, wanted: bool) -> Tensor | None:
    """A per-channel gradient reshaped and cast to its parameter (None when not wanted)."""
    if not wanted or p is None or t is None:
        return None
    return t.reshape(p.shape).to(p.dtype)


def _fits(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``t`` is 0 or a finite normal number of ``dtype`` (nothing over- or underflows)."""
    a = t.abs()
    fi = torch.finfo(dtype)
    return bool(((a == 0) | ((a >= fi.tiny) & (a <= fi.max))).all())


def combine_(
    out: Tensor, pre: Tensor, terms: Sequence[tuple[Tensor, Tensor]], const: Tensor | None, post: Tensor
) -> Tensor:
    """``out ← (out·pre + Σ tᵢ·cᵢ + const) · post`` in place, with per-(sample, channel) coefficients.

    The coefficients (``pre``, ``cᵢ``, ``const``, ``post``, float64, broadcastable to ``out``) are
    scaled so every product inside the bracket is O(1) even for input at 1e±30, where e.g. r³ of a
    variance-based rstd over- or underflows float32. Where ``pre·post``, ``cᵢ·post`` and
    ``const·post`` all fit ``out``'s dtype (ordinary inputs) they are folded, one pass fewer; the
    check is on O(N·C) values.
    """
    dt = out.dtype
    folded = [pre * post, *(c * post for _, c in terms)] + ([] if const is None else [const * post])
    if all(_fits(f, dt) for f in folded):
        out.mul_(folded[0].to(dt))
        for (t, _), f in zip(terms, folded[1:]):
            out.addcmul_(t, f.to(dt))
        if const is not None:
            out.add_(folded[-1].to(dt))
        return out
    out.mul_(pre.to(dt))
    for t, c in terms:
        out.addcmul_(t, c.to(dt))
    if const is not None:
        out.add_(const.to(dt))
    return out.mul_(post.to(dt))


#: rows per block of :func:`column_sums`: its sums run down each column of a block, then the blocks'
#: sums are added (4 blocks: 3× smaller float32 error than one run down 8192 rows, same time)
_COLUMN_BLOCKS = 4


def column_sums(a: Tensor, b: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(Σ_rows a·(b − shift), Σ_rows a)`` per column of two ``(rows, C)`` tensors, in one read of each.

    No input-sized temporary: ATen's BatchNorm backward in its reduction-only mode (``∂L/∂γ``,
    ``∂L/∂β`` with mean = ``shift`` (0 if None) and invstd = 1) reads both inputs once; with
    ``a is b`` it is a sum of squares read from memory once. At 8192×1024 float32 on 2 cores it
    took 2.3 copies' time against 4+ for ``(a·b).sum(0)`` plus ``a.sum(0)`` (a 32 MiB product written and
    read back). The rows are split into :data:`_COLUMN_BLOCKS` blocks (a free view of a contiguous
    input) whose sums are added, as ATen's cascade sum does. Floating inputs of one dtype.
    """
    n, c = a.shape
    if n == 0:
        z = a.new_zeros(c)
        return z, z.clone()
    k = _COLUMN_BLOCKS if n % _COLUMN_BLOCKS == 0 and n >= 16 * _COLUMN_BLOCKS and a.is_contiguous() and b.is_contiguous() else 1
    zero = a.new_zeros(k * c) if shift is None else shift.to(a.dtype).repeat(k)
    _, sab, sa = torch.ops.aten.native_batch_norm_backward(
        a.reshape(n // k, k * c), b.reshape(n // k, k * c), None, None, None, zero, a.new_ones(k * c), True, 0.0,
        [False, True, True],
    )
    if k == 1:
        return sab, sa
    return sab.reshape(k, c).sum(0), sa.reshape(k, c).sum(0)
