"""The public statistics engine: normalize over any dims, with an affine over any dims.

Every statistics norm in normkit is "choose the dims → one moments helper → one normalize helper"
(as flax's ``linen/normalization.py``). :func:`normalize` exposes that choice directly, so a new
variant is a configuration instead of a new kernel::

    # LayerNorm over the last dim
    normalize(x, -1, weight=w, bias=b)
    # per-head QK-norm with a weight per head: x (B, T, H, Dh), statistics per head, weight (H, Dh)
    normalize(x, -1, feature_dims=(-2, -1), center=False, weight=w_hd, eps=1e-6)
    # a norm over two trailing dims, e.g. (..., H, W) of a feature map, one weight per (H, W)
    normalize(x, (-2, -1), weight=w_hw)
    # InstanceNorm with a per-channel affine, masked statistics
    normalize(x, (2, 3), feature_dims=1, weight=w_c, bias=b_c, mask=keep)

The input is viewed as the engine's canonical ``(N, G, Cg, L)`` tensor (:mod:`normkit.kernels.canonical`):
``N`` the dims that are neither reduced nor carry a weight, ``G`` the weighted dims that are not
reduced (one set of statistics per entry), ``Cg`` the weighted reduced dims, ``L`` the reduced dims
without a weight. When the dims already lie in that order the view is free; otherwise the input is
permuted into it (one copy) and the output permuted back. The statistics then run on the backend
chain every normkit norm uses (``"auto"``: normkit's C++ kernels on CPU where the layout allows,
the eager closed form otherwise; masks and a ``reducer`` — cross-process sums — through the
statistics engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normkit.functional._core import canonical_mask, check_eps, check_float, normalize_view, with_offset
from normkit.stats import Reducer


def _dims(dims: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    seq = (dims,) if isinstance(dims, int) else tuple(dims)
    out = []
    for d in seq:
        if not isinstance(d, int) or not -ndim <= d < ndim:
            raise ValueError(f"normalize: {what} must be dims of a {ndim}-D input (in [{-ndim}, {ndim - 1}]), got {dims!r}")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"normalize: {what} repeats a dim: {dims!r}")
    return tuple(sorted(out))


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def normalize(
    x: Tensor,
    reduce_dims: int | Sequence[int] = -1,
    *,
    feature_dims: int | Sequence[int] | None = None,
    center: bool = True,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    weight_offset: float = 0.0,
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Normalize ``x`` with statistics over ``reduce_dims``, then a per-feature affine over ``feature_dims``.

    ``center=True`` (LayerNorm-style)::

        y = (x − E_R[x]) / sqrt(Var_R[x] + eps) · (weight_offset + w) + b      (biased variance)

    ``center=False`` (RMSNorm-style): ``y = x / sqrt(E_R[x²] + eps) · (weight_offset + w) + b``.

    Args:
        x: floating-point input of any rank.
        reduce_dims: dim(s) the statistics are taken over (``R``).
        feature_dims: dim(s) ``weight`` and ``bias`` are indexed by; default ``reduce_dims``
            (LayerNorm). Features outside ``R`` get their own statistics (per-head norms).
        weight, bias: tensors with ``prod(x.shape[d] for d in feature_dims)`` elements (any shape
            with that many elements, e.g. ``x.shape[feature_dims]``), or None.
        mask: bool, broadcastable to ``x``; statistics only over the True positions.
        reducer: sums the statistics' partial sums across processes (:mod:`normkit.stats`).
        stats_dtype: accumulation dtype (default float32 for half inputs).
        backend: kernel backend (:mod:`normkit.backend`); ``None`` follows the global setting.

    Returns the normalized tensor, same shape and dtype as ``x``.
    """
    check_float(x)
    eps = check_eps(eps)
    nd = x.dim()
    red = _dims(reduce_dims, nd, "reduce_dims")
    feat = red if feature_dims is None else _dims(feature_dims, nd, "feature_dims")
    if not red:
        raise ValueError("normalize: reduce_dims must name at least one dim")
    batch = [d for d in range(nd) if d not in red and d not in feat]
    groups = [d for d in feat if d not in red]
    chans = [d for d in feat if d in red]
    rest = [d for d in red if d not in feat]
    order = batch + groups + chans + rest
    sizes = [_prod([x.shape[d] for d in part]) for part in (batch, groups, chans, rest)]
    nfeat = sizes[1] * sizes[2]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.numel() != nfeat:
            want = tuple(x.shape[d] for d in feat)
            raise ValueError(f"normalize: {name} must have {nfeat} elements (shape {want} over feature_dims), "
                             f"got shape {tuple(p.shape)}")
    identity = order == list(range(nd))
    xp = x if identity else x.permute(order)
    x4 = xp.reshape(sizes)
    m4 = None
    if mask is not None:
        full = canonical_mask(mask, x, x.shape)  # validated and broadcast to x
        m4 = (full if identity else full.permute(order)).reshape(sizes)
    w, b = with_offset(weight, weight_offset), bias
    if groups + chans != list(feat):  # the weight's feature order differs from the view's (G, Cg) order
        fshape, perm = [x.shape[d] for d in feat], [feat.index(d) for d in groups + chans]
        w = None if w is None else w.reshape(fshape).permute(perm)
        b = None if b is None else b.reshape(fshape).permute(perm)
    y4 = normalize_view(
        x4, w, b, (2, 3), center=center, eps=eps, mask=m4, reducer=reducer, stats_dtype=stats_dtype, backend=backend,
    )[0]
    y = y4.reshape(xp.shape)
    if identity:
        return y
    inverse = [0] * nd
    for i, d in enumerate(order):
        inverse[d] = i
    return y.permute(inverse)
