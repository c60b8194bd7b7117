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

    Centred sums are taken about a shift ``K`` common to all processes (:func:`synced_sums`): the
    layer's previous synchronized mean (a module's reducer keeps it), else ``shift`` (e.g. a running
    mean), so there is no ``E[x²] − E[x]²`` cancellation; in steady state the whole call is **one**
    collective of ``2C + 1`` values (:func:`normkit.sync.reduce_packed`). A layer's first call, and a
    bare reducer without ``shift``, use the exact two-pass form (two collectives). Without a reducer
    ``shift`` is not needed and ignored (two local passes).
    """
    dims = _normalize_dims(x, dims)
    xf = x.to(accumulation_dtype(x.dtype, stats_dtype))
    kept = [1 if i in dims else s for i, s in enumerate(xf.shape)]
    w = None if mask is None else _mask_weights(xf, mask)
    if not center:
        count = _count(xf, dims, w)
        if reducer is not None:
            count, sq = _reduce([count, _wsum(xf.square(), dims, w)], reducer)
        else:
            sq = _wsum(xf.square(), dims, w)
        return Reduced(None, sq / count, count.expand(kept))
    if reducer is None or (shift is None and getattr(reducer, "memory", None) is None):
        # the exact two-pass form (mean, then squared deviations): one process, or a bare reducer without a
        # shift (two collectives: (n, Σx), then Σ(x − mean)²)
        count = _count(xf, dims, w)
        count, total = _reduce([count, _wsum(xf, dims, w)], reducer)
        mean = total / count
        (sq,) = _reduce([_wsum((xf - mean).square(), dims, w)], reducer)
        return Reduced(mean, sq / count, count.expand(kept))
    (sums,) = synced_sums([SumSpec(xf, dims, w, shift)], reducer)
    return moments_from_sums(sums)


class SumSpec(NamedTuple):
    """One statistic a layer call synchronizes (:func:`synced_sums`).

    ``x`` (in the accumulation dtype) reduced over ``dims``; ``weight``: None or float weights
    broadcastable to ``x`` (a mask as 0/1) — the count is ``Σ weight`` over ``dims`` in the weight's own
    shape, so an ``(N, 1, H, W)`` mask sends one count, not one per channel; ``shift``: a value common to
    every process to shift by when the reducer keeps no memory (e.g. a running mean; None: the exact
    global mean from a first collective); ``gram``: ``x`` is grouped ``(N, G, n, L)``, reduced over
    ``(0, 3)``, and the second sums are the per-group cross products ``Σ(x−K)(x−K)ᵀ`` ``(G, n, n)``.
    """

    x: Tensor
    dims: tuple[int, ...]
    weight: Tensor | None = None
    shift: Tensor | None = None
    gram: bool = False


class Sums(NamedTuple):
    """The global sums of one :class:`SumSpec` about its shift ``K`` (kept axes):
    ``count`` n, ``s1 = Σw(x−K)``, ``s2 = Σw(x−K)²`` (or the cross products with ``gram``)."""

    shift: Tensor
    count: Tensor
    s1: Tensor
    s2: Tensor


def synced_sums(specs: Sequence[SumSpec], reducer: Reducer | None) -> list[Sums]:
    """The shifted sums of several statistics, summed over the processes in **one** collective.

    The one place synchronized centred statistics are formed (BatchNorm and its variants through
    :func:`reduced_moments`, EvoNorm-B0, LOAN, RegionNorm, GDWCT's covariance). ``E[x²] − E[x]²``
    from raw sums loses ``log10(μ²/σ²)`` digits (about 12 of float64's 16 at x = 1e6 + N(0, 1)); sums
    about a shift ``K`` lose only ``log10((μ−K)²/σ²)``. ``K`` must be the same on every process. It is,
    per statistic:

    1. the layer's synchronized mean of its previous training call, kept in the reducer's
       :class:`normkit.sync.ShiftMemory` (``normkit.nn._base.sync_reducer`` supplies it): computed by
       every process from the same all-reduced sums, hence equal everywhere, and close to this batch's
       mean — steady state is **one** collective of ``(2C + 1)`` values per statistic;
    2. without a memory, the spec's ``shift`` (e.g. the running mean, which DDP keeps equal);
    3. otherwise (a layer's first call) the exact global mean from a first collective of ``(n, Σx)``
       (no gradient through it): the exact two-pass form, two collectives.

    ``K`` is detached; ``mean = K + s1/n`` and ``var = s2/n − (s1/n)²`` (:func:`moments_from_sums`) are
    exact functions of ``x`` for autograd, so gradients equal the single-process ones. The new means
    are stored as the next call's shifts. Without a reducer the same sums are formed locally.
    """
    memory = getattr(reducer, "memory", None)
    slots = [reducer.next_slot() if memory is not None else -1 for _ in specs]  # type: ignore[union-attr]
    counts, shifts = [], []
    for spec, slot in zip(specs, slots):
        if spec.gram and (spec.weight is not None or spec.x.dim() != 4 or tuple(spec.dims) != (0, 3)):
            raise ValueError("synced_sums: gram sums need an unweighted (N, G, n, L) x reduced over (0, 3)")
        kept = torch.Size(1 if i in spec.dims else n for i, n in enumerate(spec.x.shape))
        count = _count(spec.x, spec.dims, spec.weight)
        k = None
        if memory is not None:
            k = memory.get(slot, spec.x.new_empty(kept))
        elif spec.shift is not None:
            # the shift is usually a buffer the caller updates in place after this call: concatenated with
            # the count (a value the forward uses) it becomes one aten.cat that torch.compile saves for
            # backward instead of re-reading the updated buffer there (normkit.functional._core.snapshot)
            both = torch.cat([count.reshape(-1), spec.shift.detach().to(spec.x.dtype).reshape(-1)])
            count, k = both[: count.numel()].reshape(count.shape), both[count.numel():].reshape(kept)
        counts.append(count)
        shifts.append(k)
    missing = [i for i, k in enumerate(shifts) if k is None]
    if missing:  # the exact global means first (two-pass): no cancellation on a layer's first call either
        for i, k in zip(missing, global_means([specs[i] for i in missing], reducer)):
            shifts[i] = k
    parts = []
    for spec, count, k in zip(specs, counts, shifts):
        d = spec.x - k
        second = (d @ d.transpose(-1, -2)).sum(0) if spec.gram else _wsum(d.square(), spec.dims, spec.weight)
        parts += [count, _wsum(d, spec.dims, spec.weight), second]
    summed = _reduce(parts, reducer)
    out = [Sums(k, *summed[3 * i: 3 * i + 3]) for i, k in enumerate(shifts)]  # type: ignore[arg-type]
    if memory is not None:
        with torch.no_grad():
            for slot, s in zip(slots, out):
                memory.put(slot, s.shift + s.s1 / s.count, s.shift)
    return out


def global_means(specs: Sequence[SumSpec], reducer: Reducer | None) -> list[Tensor]:
    """The exact global (weighted) means of ``specs`` over all processes, without gradient, in one
    collective: the shift of a layer's first synchronized call (:func:`synced_sums`; AdaB2N's per-task
    sums). 0 where a mean is not finite (no samples anywhere: any common shift will do)."""
    with torch.no_grad():
        parts: list[Tensor] = []
        for spec in specs:
            x = spec.x.detach()
            parts += [_count(x, spec.dims, spec.weight), _wsum(x, spec.dims, spec.weight)]
        summed = _reduce(parts, reducer)
    means = [summed[2 * j + 1] / summed[2 * j] for j in range(len(specs))]
    return [torch.where(torch.isfinite(m), m, torch.zeros_like(m)) for m in means]


def moments_from_sums(s: Sums) -> Reduced:
    """Mean ``K + s1/n`` and biased variance ``s2/n − (s1/n)²`` (clamped at 0) of :func:`synced_sums`'
    result, with the count expanded to the kept axes (gram sums: use :attr:`Sums.s2` directly)."""
    m1 = s.s1 / s.count
    return Reduced(s.shift + m1, (s.s2 / s.count - m1.square()).clamp_min(0), s.count.expand(s.shift.shape))


def _count(x: Tensor, dims: Sequence[int], weight: Tensor | None) -> Tensor:
    """Included positions over ``dims``: one number without weights (sent once, not per statistic: ``2C + 1``
    values for C channels), else ``Σ weight`` in the weight's own (kept) shape."""
    if weight is None:
        return x.new_full((1,) * x.dim(), _numel(x, tuple(dims)))
    return weight.sum(tuple(dims), keepdim=True)


def _wsum(t: Tensor, dims: Sequence[int], weight: Tensor | None) -> Tensor:
    return (t if weight is None else t * weight).sum(tuple(dims), keepdim=True)


def _reduce(parts: list[Tensor], reducer: Reducer | None) -> list[Tensor]:
    from normkit.sync import reduce_packed

    return list(parts) if reducer is None else reduce_packed(parts, reducer)


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
