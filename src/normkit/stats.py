"""The statistics engine: the one place that computes normalization moments.

Every statistics-based norm in normkit asks this module for its moments over a set of axes,
so dtype policy, masking and cross-process reduction are decided once:

* **accumulation dtype** — float16/bfloat16 inputs are reduced in float32 (their 8/11-bit
  mantissas lose whole digits when summing thousands of values); float32 and float64 stay as
  they are. ``stats_dtype`` overrides the choice.
* **mask** — a boolean tensor broadcastable to the input; ``True`` marks the positions that
  contribute to the statistics (e.g. real tokens, not padding). The result equals the moments
  of the input with the masked-out positions dropped.
* **reducer** — a hook for cross-process statistics (SyncBatchNorm-style). It receives a tensor
  of *sums* and must return the sum of that tensor over all participating processes (the
  semantics of ``all_reduce(SUM)``). Sums, not means, are reduced so unequal per-process
  counts (masks, uneven batches) are weighted correctly. :func:`all_reduce_sum` builds one
  from ``torch.distributed`` (:class:`normkit.sync.GroupSum`); :func:`reduced_moments` packs a
  norm's sums so each call is one collective.

Without mask or reducer the engine calls ``torch.var_mean`` (a fused two-pass kernel);
with either it computes masked sums in two passes (mean first, then squared deviations),
which is numerically stable where ``E[x²] − E[x]²`` is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Moments(NamedTuple):
    """Mean and variance with the reduced axes kept (size 1) so they broadcast against the input."""

    mean: Tensor
    var: Tensor


def rescue_scale(dtype: torch.dtype) -> float:
    """The exact power of two ``c = 2^−(max_exp/2 + 6)`` (2^−70 for float32/bfloat16, 2^−518 for float64)
    by which an input is scaled where its sum of squares overflowed: ``(c·x)²`` of any finite value is
    finite, and dividing back by ``c`` is exact. The one constant of every overflow rescue here."""
    return 2.0 ** -(math.frexp(torch.finfo(dtype).max)[1] // 2 + 6)


def accumulation_dtype(dtype: torch.dtype, stats_dtype: torch.dtype | None = None) -> torch.dtype:
    """Dtype the statistics are computed in: float32 for half types, else the input dtype."""
    if stats_dtype is not None:
        if not stats_dtype.is_floating_point:
            raise ValueError(f"stats_dtype must be a floating dtype, got {stats_dtype}")
        return stats_dtype
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _normalize_dims(x: Tensor, dims: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    out = tuple(sorted({d % x.dim() for d in dims}))
    if not out:
        raise ValueError("moments need at least one axis to reduce over")
    return out


def _mask_weights(x: Tensor, mask: Tensor) -> Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = included in the statistics), got {mask.dtype}")
    try:
        return mask.expand_as(x).to(x.dtype)
    except RuntimeError as e:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the input shape {tuple(x.shape)}"
        ) from e


def moments(
    x: Tensor,
    dims: Sequence[int] | int,
    *,
    correction: int = 0,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
) -> Moments:
    """Mean and variance of ``x`` over ``dims`` (kept as size-1 axes).

    Args:
        x: input tensor.
        dims: axes to reduce over.
        correction: 0 for the biased (population) variance used to normalize, 1 for the
            unbiased (Bessel-corrected) estimate used by running statistics.
        mask: optional bool tensor broadcastable to ``x``; True = included.
        reducer: optional cross-process sum (see module docstring).
        stats_dtype: accumulation dtype override (default: :func:`accumulation_dtype`).
    """
    dims = _normalize_dims(x, dims)
    if mask is None and reducer is None:
        xf = x.to(accumulation_dtype(x.dtype, stats_dtype))
        var, mean = torch.var_mean(xf, dims, correction=correction, keepdim=True)
        return Moments(mean, var)
    r = reduced_moments(x, dims, mask=mask, reducer=reducer, stats_dtype=stats_dtype)
    var = r.var if correction == 0 else r.var * (r.count / (r.count - correction))
    return Moments(r.mean, var)  # type: ignore[arg-type]


def mean_square(
    x: Tensor,
    dims: Sequence[int] | int,
    *,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
) -> Tensor:
    """Mean of ``x²`` over ``dims`` (kept) — the statistic of RMS-type norms."""
    dims = _normalize_dims(x, dims)
    if mask is None and reducer is None:
        xf = x.to(accumulation_dtype(x.dtype, stats_dtype))
        return xf.square().mean(dims, keepdim=True)
    return reduced_moments(x, dims, center=False, mask=mask, reducer=reducer, stats_dtype=stats_dtype).var


class Reduced(NamedTuple):
    """Moments from (possibly cross-process) sums: ``mean`` (None when not centred), the biased
    ``var`` (the mean square when not centred) and the ``count`` behind them, all with the reduced
    axes kept."""

    mean: Tensor | None
    var: Tensor
    count: Tensor


def reduced_moments(
    x: Tensor,
    dims: Sequence[int] | int,
    *,
    center: bool = True,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    shift: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
) -> Reduced:
    """Count-weighted moments of ``x`` over ``dims`` from sums, the engine's synchronized path.

    The norm declares what it needs by ``center``: ``(n, Σx, Σx²)`` for mean and variance,
    ``(n, Σx²)`` for the mean square (PowerNorm, RMS-type). ``n`` is the number of included
    positions (``Σ mask``). With a ``reducer`` the sums of every process are added, so uneven
    batches, per-process masks and a process with no samples give the moments of the concatenated
    batch; gradients flow through the reducer (see :mod:`normkit.sync`).

    Cancellation: ``E[x²] − E[x]²`` loses ``log10(μ²/σ²)`` digits. The centred sums are therefore
    taken about a **shift** ``K`` (detached): ``Σ(x−K)``, ``Σ(x−K)²``, then
    ``mean = K + Σ(x−K)/n``, ``var = Σ(x−K)²/n − (Σ(x−K)/n)²``, which loses only
    ``log10((μ−K)²/σ²)`` digits. ``K`` must be the same on every process (a layer's running mean:
    synchronized updates keep it equal, DDP and :func:`normkit.distributed.convert_sync_norms`
    broadcast it); then the whole call is **one** collective of ``(2C + 1)``-sized sums
    (:func:`normkit.sync.reduce_packed`). Without a shift the exact two-pass form runs instead —
    ``(n, Σx)`` reduced, then ``Σ(x − mean)²`` reduced: no cancellation, two collectives.
    """
    from normkit.sync import reduce_packed

    dims = _normalize_dims(x, dims)
    xf = x.to(accumulation_dtype(x.dtype, stats_dtype))
    kept = [1 if i in dims else s for i, s in enumerate(xf.shape)]
    w = None if mask is None else _mask_weights(xf, mask)
    # without a mask the count is one number (sent once, not per statistic): (2C + 1) values for C channels
    count = xf.new_full((1,) * xf.dim(), _numel(xf, dims)) if w is None else w.sum(dims, keepdim=True)

    def wsum(t: Tensor) -> Tensor:
        return (t if w is None else t * w).sum(dims, keepdim=True)

    def reduce(*parts: Tensor) -> list[Tensor]:
        return list(parts) if reducer is None else reduce_packed(parts, reducer)

    if not center:
        count, sq = reduce(count, wsum(xf.square()))
        return Reduced(None, sq / count, count.expand(kept))
    if shift is not None:
        # the shift is usually a buffer the caller updates in place after this call: concatenated with the
        # count (a value the forward uses) it becomes one aten.cat that torch.compile saves for backward
        # instead of re-reading the updated buffer there (see normkit.functional._core.snapshot)
        both = torch.cat([count.reshape(-1), shift.detach().to(xf.dtype).reshape(-1)])
        k = both[count.numel():].reshape(kept)
        d = xf - k
        count, s1, s2 = reduce(count, wsum(d), wsum(d.square()))
        m1 = s1 / count
        return Reduced(k + m1, (s2 / count - m1.square()).clamp_min(0), count.expand(kept))
    count, total = reduce(count, wsum(xf))
    mean = total / count
    (sq,) = reduce(wsum((xf - mean).square()))
    return Reduced(mean, sq / count, count.expand(kept))


class FusedMoments(NamedTuple):
    """Statistics for a fused normalize: ``inner`` feeds the output, ``outer`` is returned."""

    inner_mean: Tensor | None
    inner_var: Tensor
    mean: Tensor | None
    var: Tensor


def fused_moments(x: Tensor, dims: Sequence[int] | int, *, center: bool = True, fused: bool = True) -> FusedMoments:
    """Biased moments of ``x`` over ``dims``, computed twice for a compiler that fuses the norm.

    Under ``torch.compile`` a statistic that is both consumed by the normalized output and
    returned from the graph is materialized in its own loop, which splits "reduce the row, then
    normalize it" into three passes over memory (measured at 8192×1024 fp32: 3.0 ms instead of
    2.25 ms for LayerNorm's forward). Returning *separately computed* reductions (``outer``),
    while the output uses its own (``inner``), keeps every reduction and the output in one loop
    over rows with the data still in cache. Both are the plain two-pass formulas
    (mean, then mean squared deviation — no ``E[x²] − E[x]²`` cancellation), with every term
    scaled by 1/n before it is summed so neither overflows where ``torch.var_mean`` does not;
    they differ only in rounding. Two-pass is a little less accurate than ``var_mean``'s Welford
    update when the mean is not representable (fp32 row at 3e4 ± 1e-3: var 9.5e-7 vs 7.2e-7;
    float64 7.2e-7). ``center=False`` gives the mean square (RMS norms) and no mean.

    With ``fused=False`` (eager code), or for float16/bfloat16 ``x`` (an explicit half
    ``stats_dtype``: summing in the input dtype would lose the row sum, where ``var_mean``
    accumulates in float32), there is one copy, from :func:`moments` / :func:`mean_square`,
    returned as both ``inner`` and outer.
    """
    if not fused or x.dtype in _LOW_PRECISION:
        if center:
            mean, var = moments(x, dims)
            return FusedMoments(mean, var, mean, var)
        ms = mean_square(x, dims)
        return FusedMoments(None, ms, None, ms)
    dims = _normalize_dims(x, dims)
    inv = 1.0 / _numel(x, dims)
    # squares are scaled by 1/n before they are summed (as the variance of var_mean, which does not
    # overflow where Σx² would: |x| ~ 1e19 in fp32); the two copies are spelled differently on purpose
    if not center:
        return FusedMoments(None, (x * (x * inv)).sum(dims, keepdim=True), None, ((x * inv) * x).sum(dims, keepdim=True))
    inner_mean = (inv * x).sum(dims, keepdim=True)  # scaled before summing: no fp16/bf16 overflow of Σx
    dev = x - inner_mean
    inner_var = (dev * (dev * inv)).sum(dims, keepdim=True)
    return FusedMoments(inner_mean, inner_var, (x * inv).sum(dims, keepdim=True), ((dev * inv) * dev).sum(dims, keepdim=True))


def _numel(x: Tensor, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


def all_reduce_sum(group: object | None = None) -> Reducer:
    """A :data:`Reducer` that sums over the processes of a ``torch.distributed`` group (default: the world).

    The autograd-aware, compile-traceable collective of :mod:`normkit.sync` (gradients flow through
    the synchronized statistics, as in SyncBatchNorm). Calling it before ``init_process_group``
    raises a ValueError.
    """
    from normkit.sync import GroupSum

    return GroupSum("world" if group is None else group)
