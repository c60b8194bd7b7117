"""Region Normalization (RN): separate statistics for the hole and the valid region of an inpainting mask.

Yu, Guo, Jin, Wu, Chen, Li, Zhang & Liu, "Region Normalization for Image Inpainting", AAAI 2020,
arXiv:1911.10375. Official code: ``geekyutao/RN`` (``rn.py``: ``RN_binarylabel``, ``RN_B``, ``RN_L``,
``SelfAware_Affine``), read at commit b0a9476.

The core op follows ``RN_binarylabel.rn`` literally. For a region mask ``m`` (1 = inside the region),

    S   = Σ m                       over the reduced axes, set to 1 where it is 0
    μ   = Σ (x·m) / S               the region mean
    z   = x·m + (1 − m)·μ           the outside of the region is filled with its mean
    out = (z − mean(z)) / sqrt(var(z) + eps) · sqrt(S / count)

with biased ``mean``/``var`` over all ``count`` reduced positions (``BatchNorm2d(affine=False,
track_running_stats=False)`` in the official code). For a binary mask this equals, inside the region,
``(x − μ_r) / sqrt(σ_r² + eps·count/S)`` (σ_r² the biased variance of the region's values), and 0
outside. An empty region (S = 0) gives ``μ = 0``, ``z = 0`` and an output of 0 — never NaN.

Speed (binary masks, no process group): backends ``"auto"``/``"kernels"`` on a contiguous CPU
float32/float64 input run ``kernels/csrc/region_norm.cpp`` (:class:`_RegionKernelFn`; RN-L's pooling and
map convolutions too); ``backend="eager"`` and everything else the ATen closed form
(:class:`_RegionNormFn`) or the official formula (:func:`_reference`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as TF
from torch import Tensor

from normkit import backend as _backend
from normkit.functional._core import check_channels_first, check_eps, check_float, check_param
from normkit.kernels import cpu as _cpu
from normkit.kernels import ops as _ops
from normkit.stats import Reducer, SumSpec, accumulation_dtype, moments, rescue_scale, synced_sums


def _check_input(x: Tensor, what: str) -> int:
    c = check_channels_first(x, None, what)
    if x.dim() < 3:
        raise ValueError(f"{what} expects an (N, C, *spatial) input with at least one spatial dim, got shape {tuple(x.shape)}")
    return c


def _prepare_mask(mask: Tensor, x: Tensor, what: str) -> Tensor:
    """Validate the mask (N, 1 or C, *spatial'); resize it to x's spatial size with 'nearest' as the official code."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{what}: mask must be a torch.Tensor of shape (N, 1, *spatial), got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{what}: mask must be a bool or real tensor (1 = hole), got dtype {mask.dtype}")
    n, c = x.shape[:2]
    if mask.dim() != x.dim() or mask.shape[0] != n or mask.shape[1] not in (1, c):
        want = f"(N={n}, 1, *spatial)" if c == 1 else f"(N={n}, 1 or {c}, *spatial)"
        raise ValueError(
            f"{what} expects a mask of shape {want} with {x.dim() - 2} spatial dims (1 = hole), "
            f"got {tuple(mask.shape)} for input {tuple(x.shape)}"
        )
    m = mask.detach().to(accumulation_dtype(x.dtype))
    if m.shape[2:] != x.shape[2:]:
        if x.dim() > 5:
            raise ValueError(f"{what}: a mask of another spatial size can only be resized for 1-3 spatial dims")
        # official: F.interpolate(mask, size=x.size()[2:], mode='nearest') (a downsampled mask may lose a region)
        m = TF.interpolate(m, size=tuple(x.shape[2:]), mode="nearest")
    return m


def region_normalize(x: Tensor, mask: Tensor, eps: float = 1e-5, *, per_sample: bool = False) -> Tensor:
    """Region normalization without affine (``RN_binarylabel`` of the official code).

    Normalizes the region ``mask == 1`` and the region ``mask == 0`` separately, each with its own
    per-channel mean and biased variance, and returns the sum of both (so every position is normalized
    with the statistics of its own region). See the module docstring for the exact formula and the
    ``eps·count/S`` effective epsilon it implies.

    Args:
        x: ``(N, C, *spatial)`` features.
        mask: ``(N, 1, *spatial)`` (or ``(N, C, *spatial)``), 1 = hole/foreground region, 0 = the rest;
            bool or float, detached. Resized to x's spatial size with ``mode='nearest'`` if it differs.
            Meant to be binary; soft values follow the official formula literally.
        eps: added to the variance of the mean-filled tensor (BatchNorm's eps, 1e-5).
        per_sample: ``False`` (default, official code): BN-style statistics per channel over the batch
            and the spatial positions of the region. ``True``: IN-style statistics per (sample, channel),
            as the paper's equations (the authors' README: "RN can be both BN-style or IN-style").
            Batch statistics are used in training and eval alike; there are no running statistics.
    """
    eps = check_eps(eps)
    _check_input(x, "region_normalize")
    m = _prepare_mask(mask, x, "region_normalize")
    one = x.new_ones((1, x.shape[1]) + (1,) * (x.dim() - 2), dtype=m.dtype)
    return _region_affine(x, m, one, None, torch.zeros_like(one), None, eps, per_sample).to(x.dtype)


def _region_affine(
    x: Tensor, m: Tensor, g1: Tensor, g0: Tensor | None, b1: Tensor, b0: Tensor | None, eps: float,
    per_sample: bool, reducer: Reducer | None = None, link: _DxLink | None = None, binary: bool = False,
) -> Tensor:
    """``y = rn·G + B`` with ``rn = region_normalize(x, m)`` and the scale/shift chosen per region:
    ``G = m·g1 + (1 − m)·g0`` (``g0`` None: ``g1`` everywhere), ``B`` likewise; ``g*``/``b*`` broadcast to
    x, per channel ``(1, C, 1, …)`` or a spatial map ``(N, 1, *spatial)``. Returns the accumulation dtype.

    Binary masks without a reducer: with backends ``"auto"``/``"kernels"`` on a CPU float32/float64
    contiguous input and a one-channel mask, the fused C++ kernels of ``csrc/region_norm.cpp``
    (:class:`_RegionKernelFn`: one memory read of x for the statistics, one write of y; backward one
    read of ∂y and x for the sums, one write of ∂x; saves x, the mask and O(N·C) statistics); under
    ``torch.compile`` with ``backend="kernels"`` their operator ``torch.ops.normkit.region_norm`` where
    the mask is known to be binary (RN-L's threshold: a graph cannot check an input mask's values).
    Otherwise, in eager code, :class:`_RegionNormFn` (batched products with the mask matrix, saves x,
    the centred x and the mask); soft masks, ``torch.compile`` with other backends and synchronized
    statistics take the official formula (:func:`_reference`). ``binary=True``: the caller knows the
    mask is binary (RN-L's threshold), so it is not checked; ``link``: RN-L's shared ∂x buffer
    (:class:`_DxLink`)."""
    xf = x.to(m.dtype)
    n, c = x.shape[:2]
    kernel = _kernel_route(xf, m, reducer)
    if kernel == "op" and not binary:  # a mask of unknown values cannot be checked inside a graph
        kernel = None
    if kernel is not None and (binary or bool(((m == 0) | (m == 1)).all())):
        gc, bc, gmap, bmap = _kernel_tables(c, g1, g0, b1, b0)
        if kernel == "op":
            y = torch.ops.normkit.region_norm(xf, m, gc, bc, gmap, bmap, per_sample, eps)[0]
            return y
        if gmap is not None:  # RN-L's maps (views of one 2-channel conv output): copied once, here
            g1, b1 = g1.contiguous(), b1.contiguous()
        return _RegionKernelFn.apply(xf, m, g1, g0, b1, b0, eps, per_sample, link)
    if (reducer is None and not torch.compiler.is_compiling() and xf.numel() > 0
            and (binary or bool(((m == 0) | (m == 1)).all()))):
        length = xf[0, 0].numel()

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(t.shape[0], t.shape[1], -1)  # (1, C, 1) or (N, 1, L)

        def ref(x3: Tensor, m3: Tensor, *p: Tensor | None) -> Tensor:
            return _reference(x3, m3, *p, eps, per_sample)

        y = _RegionNormFn.apply(
            xf.reshape(n, c, length), m.reshape(n, m.shape[1], length), flat(g1), flat(g0), flat(b1), flat(b0),
            eps, per_sample, ref, link,
        )
        return y.reshape(x.shape)
    return _reference(xf, m, g1, g0, b1, b0, eps, per_sample, reducer)


def _reference(
    xf: Tensor, m: Tensor, g1: Tensor, g0: Tensor | None, b1: Tensor, b0: Tensor | None, eps: float,
    per_sample: bool, reducer: Reducer | None = None,
) -> Tensor:
    """The official formula (``RN_binarylabel`` for both regions, then the affine), plain autograd."""
    if reducer is not None and not per_sample:
        r = _rn_synced(xf, m, eps, reducer)
    else:
        r = _rn(xf, m, eps, per_sample) + _rn(xf, 1 - m, eps, per_sample)
    g = g1 if g0 is None else m * g1 + (1 - m) * g0
    b = b1 if b0 is None else m * b1 + (1 - m) * b0
    return r * g + b


def _rn_synced(xf: Tensor, m: Tensor, eps: float, reducer: Reducer) -> Tensor:
    """BN-style region normalization of both regions over every process's batch (:mod:`normkit.sync`):
    ONE packed collective of each region's per-channel ``(S, Σ(x−K), Σ(x−K)²)``
    (:func:`normkit.stats.synced_sums`; ``4C + 2`` values for a one-channel mask), taken about a shift
    ``K`` per region common to every process — the region's synchronized mean of the layer's previous
    call, kept by the module's reducer (the exact global mean from one more collective on a first call) —
    so the region variances ``Σ(x−K)²/S − (μ−K)²`` lose no digits to cancellation. The region of a
    position is its support (``m ≠ 0``): binary masks (RN-L's always are) give the official values, soft
    masks the separately-normalized regions' values."""
    dims = (0, *range(2, xf.dim()))
    inside = m != 0
    zero = xf.new_zeros(())
    w1 = inside.to(xf.dtype)
    region_sums = synced_sums([SumSpec(torch.where(inside, xf, zero), dims, w1),  # a NaN stays in its own region
                               SumSpec(torch.where(inside, zero, xf), dims, 1 - w1)], reducer)
    cnt = region_sums[0].count + region_sums[1].count
    out = torch.zeros_like(xf)
    for region, sums in zip((inside, ~inside), region_sums):
        s = torch.where(sums.count == 0, torch.ones_like(sums.count), sums.count)  # official: Sr[Sr == 0] = 1
        m1 = sums.s1 / s
        var = (sums.s2 / s - m1 * m1).clamp_min(0)
        out = torch.where(region, (xf - (sums.shift + m1)) * torch.rsqrt(var + eps * cnt / s), out)
    return out


def _rn(xf: Tensor, m: Tensor, eps: float, per_sample: bool) -> Tensor:
    dims = tuple(range(2, xf.dim())) if per_sample else (0, *range(2, xf.dim()))
    count = 1
    for d in dims:
        count *= xf.shape[d]
    # x·m and (1 − m)·μ are written as torch.where so that a NaN in one region stays there
    # (0 · NaN would be NaN); for the binary masks of RN-B/RN-L the values are the official ones
    inside = m != 0
    zero = xf.new_zeros(())
    region = torch.where(inside, xf * m, zero)
    s = m.sum(dims, keepdim=True)
    s = torch.where(s == 0, torch.ones_like(s), s)  # official: Sr[Sr == 0] = 1
    mu = region.sum(dims, keepdim=True) / s
    z = region + torch.where(m != 1, (1 - m) * mu, zero)
    zm, zv = moments(z, dims)
    out = (z - zm) * torch.rsqrt(zv + eps) * torch.sqrt(s / count)
    # outside its region the term is (μ − μ)·… = 0 by the algebra; say so exactly, so the other
    # region's statistics (NaN or not) do not leak into this one
    return torch.where(inside, out, zero)


def region_norm_b(
    x: Tensor,
    mask: Tensor,
    foreground_gamma: Tensor | None = None,
    foreground_beta: Tensor | None = None,
    background_gamma: Tensor | None = None,
    background_beta: Tensor | None = None,
    eps: float = 1e-5,
    *,
    per_sample: bool = False,
    masked_bias: bool = False,
    reducer: Reducer | None = None,
) -> Tensor:
    """Basic Region Normalization (RN-B): region-wise normalization with a per-region affine.

    Yu et al., "Region Normalization for Image Inpainting", AAAI 2020, arXiv:1911.10375 (official
    ``RN_B``). With ``r = region_normalize(x, m)`` and per-channel parameters (zero-initialised in the
    module, i.e. the scale is ``1 + γ``):

        official (masked_bias=False):  y = r·m·(1 + γ_f) + β_f + r·(1 − m)·(1 + γ_b) + β_b
        masked_bias=True:              y = m·(r·(1 + γ_f) + β_f) + (1 − m)·(r·(1 + γ_b) + β_b)

    The official code adds **both** biases at every position (they are not masked), so only
    ``β_f + β_b`` matters; ``masked_bias=True`` gives each region its own shift, as the paper's
    per-region affine reads. ``m``: 1 = hole ("foreground"), as the official data pipeline
    (mask = 255 for holes). Parameters left ``None`` count as zeros.
    """
    eps = check_eps(eps)
    c = _check_input(x, "region_norm_b")
    for name, p in (
        ("foreground_gamma", foreground_gamma),
        ("foreground_beta", foreground_beta),
        ("background_gamma", background_gamma),
        ("background_beta", background_beta),
    ):
        if p is not None:
            check_float(p, name)
        check_param(p, c, name, "region_norm_b")
    m = _prepare_mask(mask, x, "region_norm_b")
    shape = (1, c) + (1,) * (x.dim() - 2)
    sd = m.dtype

    def scale(gamma: Tensor | None) -> Tensor:
        return x.new_ones(shape, dtype=sd) if gamma is None else 1 + gamma.reshape(shape).to(sd)

    def shift(beta: Tensor | None) -> Tensor:
        return x.new_zeros(shape, dtype=sd) if beta is None else beta.reshape(shape).to(sd)

    if masked_bias:
        b1, b0 = shift(foreground_beta), shift(background_beta)
    else:  # official: both biases at every position
        b1, b0 = shift(foreground_beta) + shift(background_beta), None
    y = _region_affine(x, m, scale(foreground_gamma), scale(background_gamma), b1, b0, eps, per_sample, reducer)
    return y.to(x.dtype)


def region_norm_l(
    x: Tensor,
    sa_weight: Tensor,
    gamma_weight: Tensor,
    gamma_bias: Tensor | None,
    beta_weight: Tensor,
    beta_bias: Tensor | None,
    threshold: float = 0.8,
    eps: float = 1e-5,
    *,
    per_sample: bool = False,
    reducer: Reducer | None = None,
) -> Tensor:
    """Learnable Region Normalization (RN-L): the region mask is derived from the features themselves.

    Yu et al., "Region Normalization for Image Inpainting", AAAI 2020, arXiv:1911.10375 (official
    ``RN_L`` + ``SelfAware_Affine``):

        s    = sigmoid(conv_k([mean_c(x), max_c(x)]))      spatial response map, (N, 1, H, W); no bias
        γ, β = conv_k(s), conv_k(s)                        1-channel maps (with bias), broadcast over C
        m    = (s.detach() ≥ threshold)                    region split
        y    = region_normalize(x, m)·(1 + γ) + β

    ``conv_k`` is a k×k convolution with zero padding ``k // 2`` (official k = 7). The threshold is
    0.8 (default of the official ``RN_L`` and ``main.py --threshold``). The mask is a hard,
    non-differentiable step of the detached map: no gradient reaches the ``sa_weight`` convolution
    through the region split, only through γ and β. ``(N, C, L)`` input is treated as ``(N, C, L, 1)``.
    """
    eps = check_eps(eps)
    _check_input(x, "region_norm_l")
    if x.dim() not in (3, 4):
        raise ValueError(f"region_norm_l expects (N, C, H, W) or (N, C, L) input, got shape {tuple(x.shape)}")
    for name, w in (("sa_weight", sa_weight), ("gamma_weight", gamma_weight), ("beta_weight", beta_weight)):
        check_float(w, name)
        want_in = 2 if name == "sa_weight" else 1
        if w.dim() != 4 or w.shape[0] != 1 or w.shape[1] != want_in or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            raise ValueError(f"region_norm_l: {name} must be a (1, {want_in}, k, k) conv weight with odd k, got {tuple(w.shape)}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"region_norm_l: threshold must be in [0, 1] (it splits a sigmoid map), got {threshold!r}")
    x4 = x.unsqueeze(-1) if x.dim() == 3 else x
    # RN's ∂x and the pooling's ∂x are formed in one buffer (see _DxLink); not under a compiler
    fused = x4.requires_grad and x4.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
    link = _DxLink() if fused else None
    # the pooling and the few-channel convolutions on csrc/region_norm.cpp's kernels where RN's are used
    kern = reducer is None and _kernels_on(x4) and all(
        w is None or (w.dtype == x4.dtype and w.device == x4.device)
        for w in (sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias))
    pooled = _MeanMax.apply(x4, link, kern)
    s = torch.sigmoid(_MapConv.apply(pooled, sa_weight, None, kern))
    if gamma_weight.shape == beta_weight.shape:  # 1 + γ and β from ONE 1→2 convolution of the map (the 1 in its bias)
        zero = gamma_weight.new_zeros(1)
        bias = torch.cat([1 + (zero if gamma_bias is None else gamma_bias.reshape(1)),
                          zero if beta_bias is None else beta_bias.reshape(1)])
        scale, beta = _MapConv.apply(s, torch.cat([gamma_weight, beta_weight]), bias, kern).split(1, 1)
    else:
        scale = 1 + _MapConv.apply(s, gamma_weight, gamma_bias, kern)
        beta = _MapConv.apply(s, beta_weight, beta_bias, kern)
    sd = accumulation_dtype(x.dtype)
    m = (s.detach() >= threshold).to(sd)
    y = _region_affine(x4, m, scale.to(sd), None, beta.to(sd), None, eps, per_sample, reducer, link, binary=True)
    return (y.squeeze(-1) if x.dim() == 3 else y).to(x.dtype)


# ---------------------------------------------------------------- fast path (binary masks, eager)


class _Regions:
    """A binary float mask ``m`` ``(N, 1|C, L)`` prepared for the fast path. Everything per position is
    one batched matrix product with a per-(sample, channel, region) table ``T`` ``(N|1, C, 2)``
    (region 1 = ``m == 1`` first):

    * ``sums(t)`` — both regions' row sums of ``t`` ``(N, C, L)``, ``(N, C, 2)``: ``t @ [m, 1 − m]``, one read
      of ``t`` (measured cheaper than one elementwise product with the mask);
    * ``sel(T)`` — ``T[n, c, r(n, l)]`` as an ``(N, C, L)`` tensor: ``T @ [m, 1 − m]ᵀ``, one write. Exact for a
      binary mask (``a·1 + b·0 = a``), so region selection costs what a plain write costs, where a
      broadcasting ``torch.where`` / ``lerp`` over ``(1, C, 1)`` and ``(N, 1, L)`` costs several;
    * ``add_sel_(y, T)`` — ``y += sel(T)`` in place (``baddbmm_``).

    A per-channel mask ``(N, C, L)`` takes products with the mask and its complement instead."""

    def __init__(self, m: Tensor) -> None:
        self.m = m
        self.one = m.shape[1] == 1
        if self.one:
            self.mt = torch.stack([m[:, 0], 1 - m[:, 0]], 1)  # (N, 2, L)
        else:
            self.m0 = 1 - m

    def sums(self, t: Tensor, mt: Tensor | None = None) -> Tensor:
        """``Σ_l t[n, c, l]·w_r[n, l]`` for both regions r, ``(N, C, 2)``; ``mt`` (one-channel masks only): the
        region indicators times a map, ``self.mt·G`` (:meth:`weighted`)."""
        if self.one:
            return torch.bmm(self.mt if mt is None else mt, t.transpose(1, 2)).transpose(1, 2)
        return torch.stack([(t * self.m).sum(2), (t * self.m0).sum(2)], -1)

    def weighted(self, g: Tensor) -> Tensor:
        """``[m, 1 − m]·G`` ``(N, 2, L)`` for a map ``G`` ``(N, 1, L)``: ``sel(T, mt=…)`` is then ``T_r·G`` in one
        write and ``sums(t, mt=…)`` the region sums of ``t·G`` in one read."""
        return self.mt * g

    def sel(self, tab: Tensor, out: Tensor | None = None, mt: Tensor | None = None) -> Tensor:
        n = self.m.shape[0]
        if self.one:
            return torch.bmm(tab.expand(n, -1, -1), self.mt if mt is None else mt, out=out)
        r = torch.mul(tab[..., 1:], self.m0, out=out)
        return r.addcmul_(tab[..., :1], self.m)

    def add_sel_(self, y: Tensor, tab: Tensor) -> Tensor:
        if self.one:
            return y.baddbmm_(tab.expand(y.shape[0], -1, -1), self.mt)
        return y.addcmul_(tab[..., 1:], self.m0).addcmul_(tab[..., :1], self.m)


class _DxLink:
    """RN-L's two contributions to ∂L/∂x in one buffer: :class:`_RegionNormFn`'s backward (which autograd
    runs first: the pooling feeds its γ/β) leaves its ∂x here and returns none; :class:`_MeanMax`'s backward
    adds the pooling's share in place and returns the sum — one pass where autograd would write the
    pooling's full-size ∂x and then add the two (measured: that add alone was 14% of RN-L's fwd+bwd)."""

    __slots__ = ("dx", "finish")

    def __init__(self) -> None:
        self.dx: Tensor | None = None
        # the C++ path (:class:`_RegionKernelFn`) leaves ∂x unwritten: ``finish(pool_grad, idx)`` writes it
        # once, the pooling's gradient included (csrc/region_norm.cpp's rn_bwd_dx)
        self.finish: Callable[[Tensor, Tensor], Tensor] | None = None


class _MeanMax(torch.autograd.Function):
    """``[mean_c(x), max_c(x)]`` ``(N, 2, *spatial)``, RN-L's pooled input (official ``torch.mean`` and
    ``torch.max(x, dim=1)``, whose gradient goes to the arg-max channel). Backward writes ∂x once (the
    mean's share broadcast, the max's added at the saved indices) instead of autograd's chain of
    full-size temporaries for ``mean`` and ``amax`` — into RN's ∂x when a :class:`_DxLink` holds it;
    saves only the (N, 1, *spatial) indices."""

    @staticmethod
    def forward(ctx, x: Tensor, link: _DxLink | None = None, kern: bool = False) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        ctx.link = link
        if kern:  # one read of x (ATen's max with indices over dim 1 measured 10× a read)
            out, idx = _cpu.region_pool(x)
            ctx.save_for_backward(idx)
            return out
        mx, idx = x.max(1, keepdim=True)
        ctx.save_for_backward(idx)
        return torch.cat([x.mean(1, keepdim=True), mx], 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors  # int32 from the C++ pooling, int64 from ATen's
        link, share = ctx.link, g[:, :1] / ctx.shape[1]
        if link is not None and link.finish is not None and not torch.is_grad_enabled():
            finish, link.finish = link.finish, None
            return finish(g, idx.to(torch.int32)).view(ctx.shape), None, None
        if link is not None and link.dx is not None and not torch.is_grad_enabled():
            dx, link.dx = link.dx.view(ctx.shape), None
            return dx.add_(share).scatter_add_(1, idx.long(), g[:, 1:]), None, None
        dx, idx = share.expand(ctx.shape).contiguous(), idx.long()
        return (dx.scatter_add(1, idx, g[:, 1:]) if torch.is_grad_enabled() else dx.scatter_add_(1, idx, g[:, 1:])), None, None


class _RegionStats:
    """Region statistics of ``x`` ``(N, C, L)`` under a binary mask, as ``(N|1, C, 2)`` tables (region 1
    first; per channel, and per sample with ``per_sample``): the count ``S`` (at least 1, as the official
    ``S[S == 0] = 1``), the mean ``μ`` and ``ρ = 1/sqrt(σ² + eps·count/S)`` (σ² biased). Two reads of x:
    the region sums, then the squared deviations from the region mean (no cancellation), whose centred
    tensor ``d = x − μ_r`` is kept for the output. Where the squares overflow (|x| ≳ 1e19 in float32)
    they are redone on ``d`` scaled by 2^−70 (exact), as :func:`normkit.kernels.canonical.safe_rstd`.
    ``finite`` is False for NaN/inf input (the caller takes the reference formula)."""

    def __init__(self, x: Tensor, rg: _Regions, eps: float, per_sample: bool) -> None:
        n, c, length = x.shape
        self.rg = rg
        self.per_sample = per_sample
        count = length if per_sample else n * length
        s1 = self.pool(rg.m.sum(2, keepdim=True)).expand(-1, c, -1)
        self.s = torch.cat([s1, count - s1], 2).clamp_min(1)
        sx = self.pool(rg.sums(x))
        self.finite = math.isfinite(sx.sum().item())
        if not self.finite:
            return
        self.mu = sx / self.s
        self.d = self.centred(x)
        sq = self.d.square()
        v = self.pool(rg.sums(sq))
        self.buf = sq  # a free (N, C, L) buffer for the caller
        self.rho = torch.rsqrt(v / self.s + eps * count / self.s)
        if not math.isfinite(v.sum().item()):
            c_ = rescue_scale(x.dtype)
            w = self.pool(rg.sums(torch.mul(self.d, c_, out=sq).square_()))
            self.rho = torch.where(torch.isfinite(v), self.rho, torch.rsqrt(w / self.s) * c_)

    def pool(self, t: Tensor) -> Tensor:
        return t if self.per_sample else t.sum(0, keepdim=True)

    def centred(self, x: Tensor) -> Tensor:
        """``d = x − μ_r`` (a fresh tensor)."""
        d = self.rg.sel(self.mu)
        return torch.sub(x, d, out=d)


class _RegionNormFn(torch.autograd.Function):
    """``y = rn·G_r + B_r`` with ``rn = (x − μ_r)·ρ_r`` the region normalization of ``x`` (see
    :class:`_RegionStats`).

    ``g1``/``g0`` (scale inside / outside the region) and ``b1``/``b0`` broadcast to x ``(N, C, L)``: per
    channel ``(1, C, 1)`` for RN-B, a spatial map ``(N, 1, L)`` for RN-L; ``g0``/``b0`` None means the
    same tensor as ``g1``/``b1``. Per-channel parameters fold into the region tables: the official
    RN-B's output is ``addcmul(B, d, sel(ρG))``, one pass after the statistics. Closed-form backward
    per region (BatchNorm's, with the region's means):

        ∂x = ρ_r·(ĝ − mean_r(ĝ) − rn·mean_r(ĝ·rn)),   ĝ = ∂y·G_r

    written as ``sel(−ρ²·mean_r(ĝ·rn))·d + sel(ρG)·∂y + sel(−ρ·mean_r(ĝ))``, whose region sums come from two
    batched products (``Σ_r ∂y`` and ``Σ_r ∂y·d``; a map G weights the products' mask matrix instead of
    forming ĝ). Saves x, the centred ``d = x − μ_r`` (two input-sized tensors: recomputing d would
    cost backward two more passes), the mask and O(C) statistics (plus G, B when they are maps).
    Double backward recomputes through the reference formula.

    Each full-size op here is one pass over memory and, on a loaded machine, one more wait for the
    thread pool: the op count is the cost (7 in forward, 8 in backward for RN-B; GroupNorm's ATen
    kernels make 3).
    """

    @staticmethod
    def forward(ctx, x, m, g1, g0, b1, b0, eps, per_sample, reference, link=None):  # noqa: ANN001, ANN205
        rg = _Regions(m)
        st = _RegionStats(x, rg, eps, per_sample)
        ctx.cfg = (eps, per_sample, reference)
        ctx.link = link
        if not st.finite:  # NaN or inf in x: the official formula (a NaN stays in its own region)
            ctx.save_for_backward(x, m, g1, g0, b1, b0, None)
            ctx.st = None
            with torch.no_grad():
                return reference(x, m, g1, g0, b1, b0)
        d, buf = st.d, st.buf
        del st.d, st.buf  # the statistics kept on ctx are O(C); d goes through save_for_backward
        ctx.save_for_backward(x, m, g1, g0, b1, b0, d)
        ctx.st = st
        if g1.shape[2] > 1:  # RN-L: maps G, B (N, 1, L), one channel mask: y = d·(ρ_r·G) + B
            return torch.addcmul(b1, d, rg.sel(st.rho, out=buf, mt=rg.weighted(g1)), out=buf)
        a = rg.sel(st.rho * _pair(g1, g0), out=buf)
        if b0 is None:  # official RN-B: one shift for both regions
            return torch.addcmul(b1, d, a, out=buf)
        return rg.add_sel_(a.mul_(d), _pair(b1, b0))

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, m, g1, g0, b1, b0, d = ctx.saved_tensors
        eps, per_sample, reference = ctx.cfg
        need = ctx.needs_input_grad
        st: _RegionStats | None = ctx.st
        if st is None or torch.is_grad_enabled():  # create_graph=True or non-finite input: the official formula
            out = _replay((need[0], *need[2:6]), gy, x, m, (g1, g0, b1, b0), eps, per_sample)
            return out[0], None, out[1], out[2], out[3], out[4], None, None, None, None
        rg, s, rho = st.rg, st.s, st.rho
        maps = g1.shape[2] > 1  # RN-L: G, B (N, 1, L)
        gd = gy * d
        w = rg.weighted(g1) if maps else None
        gsum, qd = st.pool(rg.sums(gy, w)), st.pool(rg.sums(gd, w))  # Σ_r ∂y·G, Σ_r ∂y·G·d
        dg1 = dg0 = db1 = db0 = None
        if maps:
            h, k = gsum, rho * qd  # Σ_r ĝ, Σ_r ĝ·rn
            if need[2]:  # ∂G[n, l] = Σ_c ∂y·rn: the region's ρ row against ∂y·d, picked by the mask
                r = torch.bmm(rho.expand(x.shape[0], -1, -1).transpose(1, 2), gd)  # (N, 2, L)
                dg1 = (r * rg.mt).sum(1, keepdim=True)
            if need[4]:
                db1 = gy.sum(1, keepdim=True)
            pg = rho
        else:
            g = _pair(g1, g0)
            ks = rho * qd  # Σ_r ∂y·rn
            h, k = g * gsum, g * ks
            if need[2] or need[3]:
                dg1, dg0 = _split(ks, g1, g0)
            if need[4] or need[5]:
                db1, db0 = _split(gsum, b1, b0)
            pg = rho * g
        dx = None
        if need[0]:
            dx = rg.sel(-rho * rho * k / s, out=gd).mul_(d)  # −ρ²·mean_r(ĝ·rn)·d
            dx.addcmul_(gy, rg.sel(pg, mt=w))  # + ρ·G·∂y (a map G in the mask matrix)
            rg.add_sel_(dx, -rho * h / s)  # − ρ·mean_r(ĝ)
            if ctx.link is not None and need[2]:  # the pooling's backward (it runs next) adds its share and returns it
                ctx.link.dx, dx = dx, None
        return dx, None, dg1, dg0, db1, db0, None, None, None, None


# ---------------------------------------------------------------- C++ kernels (csrc/region_norm.cpp)


def _kernels_on(x: Tensor) -> bool:
    """Whether csrc/region_norm.cpp's kernels run in eager code for ``x``: backend ``"auto"`` or
    ``"kernels"``, not under a compiler, a contiguous float32/float64 CPU input, the kernels built."""
    return (x.numel() > 0 and _backend.get_backend() in ("auto", "kernels")
            and not torch.compiler.is_compiling() and _ops.accepts(x))


def _kernel_route(xf: Tensor, m: Tensor, reducer: Reducer | None) -> str | None:
    """``"fn"`` (eager: :class:`_RegionKernelFn`), ``"op"`` (compiled graph with ``backend="kernels"``:
    the operator) or None (the kernels do not apply: a reducer, a per-channel mask, another backend,
    device or dtype, an empty input, no kernels built)."""
    if reducer is not None or m.shape[1] != 1 or xf.numel() == 0:
        return None
    name = _backend.get_backend()
    compiling = torch.compiler.is_compiling()
    if name not in ("auto", "kernels") or (compiling and name != "kernels") or not _ops.accepts(xf):
        return None
    if compiling:
        return "op"
    _backend.note("regionnorm", "kernels")  # for backend.record() (the `runs` column of `normkit kernels`)
    return "fn"


def _kernel_tables(
    c: int, g1: Tensor, g0: Tensor | None, b1: Tensor, b0: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The kernels' arguments: per-(channel, region) tables ``gc``, ``bc`` ``(C, 2)`` (region 1 first) and
    the maps ``gmap``, ``bmap`` ``(N, 1, *spatial)`` (RN-L; None for per-channel parameters)."""
    if g1.shape[1] != c or g1.numel() != c:  # RN-L: spatial maps (N, 1, *spatial), no per-channel parameters
        return g1.new_ones(c, 2), b1.new_zeros(c, 2), g1, b1
    return _pair(g1.reshape(1, c, 1), g0 if g0 is None else g0.reshape(1, c, 1))[0], \
        _pair(b1.reshape(1, c, 1), b0 if b0 is None else b0.reshape(1, c, 1))[0], None, None


def _table_grads(
    t: Tensor | None, a1: Tensor, a0: Tensor | None, need1: bool, need0: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of per-channel parameters ``a1``/``a0`` behind a ``(C, 2)`` table gradient ``t``
    (``a0`` None: ``a1`` stood in both columns)."""
    if t is None:
        return None, None
    if a0 is None:
        return (t.sum(1).reshape(a1.shape) if need1 else None), None
    return (t[:, 0].reshape(a1.shape) if need1 else None), (t[:, 1].reshape(a0.shape) if need0 else None)


def _replay(
    need: tuple[bool, ...], gy: Tensor, x: Tensor, m: Tensor, params: tuple[Tensor | None, ...], eps: float,
    per_sample: bool,
) -> tuple[Tensor | None, ...]:
    """``(∂x, ∂g1, ∂g0, ∂b1, ∂b0)`` by autograd through the official formula (:func:`_reference`), for a
    double backward (grad mode on: through the saved inputs themselves, connected to the outer graph)
    or a first backward the closed form does not cover. ``need``: which of (x, g1, g0, b1, b0) want one."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        args = [None if t is None else t if create else t.detach().requires_grad_(w)
                for t, w in zip((x, *params), need)]
        y = _reference(args[0], m, *args[1:], eps, per_sample)
        live = [a for a, w in zip(args, need) if a is not None and w]
        got = iter(torch.autograd.grad(y, live, gy, create_graph=create, allow_unused=True))
    return tuple(next(got) if (a is not None and w) else None for a, w in zip(args, need))


class _RegionKernelFn(torch.autograd.Function):
    """``y = rn·G_r + B_r`` (see :class:`_RegionNormFn`) on the C++ kernels of ``csrc/region_norm.cpp``,
    for a one-channel binary mask: forward reads x once from memory for both regions' statistics and
    writes y once; backward reads ∂y and x once for the region sums and writes ∂x once (closed form,
    as :class:`_RegionNormFn`'s). Saves x, the mask, the parameters (O(C) or RN-L's (N, 1, L) maps) and
    the ``(N|1, C, 2)`` statistics — one input-sized tensor. A double backward replays the official
    formula (:func:`_replay`). ``link``: RN-L's shared ∂x buffer (:class:`_DxLink`)."""

    @staticmethod
    def forward(ctx, x, m, g1, g0, b1, b0, eps, per_sample, link=None):  # noqa: ANN001, ANN205
        gc, bc, gmap, bmap = _kernel_tables(x.shape[1], g1, g0, b1, b0)
        y, mu, rho = _cpu.region_norm_forward(x, m, gc, bc, gmap, bmap, per_sample, eps)
        ctx.save_for_backward(x, m, g1, g0, b1, b0, gc, mu, rho)
        ctx.cfg = (eps, per_sample, gmap is not None)
        ctx.link = link
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, m, g1, g0, b1, b0, gc, mu, rho = ctx.saved_tensors
        eps, per_sample, maps = ctx.cfg
        need = ctx.needs_input_grad
        want = (need[0], *need[2:6])
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            dx, dg1, dg0, db1, db0 = _replay(want, gy, x, m, (g1, g0, b1, b0), eps, per_sample)
            return dx, None, dg1, dg0, db1, db0, None, None, None
        wants = (not maps and (need[2] or need[3]), not maps and (need[4] or need[5]), maps and need[2], maps and need[4])
        gmap = g1 if maps else None
        sums, dgc, dbc, dgm, dbm = _cpu.region_norm_backward_sums(gy, x, m, gc, gmap, mu, rho, per_sample, wants)
        dx = None
        if need[0] and ctx.link is not None and need[2]:  # the pooling's backward (next) writes ∂x with its share
            ctx.link.finish = functools.partial(_cpu.region_norm_backward_dx, gy, x, m, gc, gmap, mu, rho, per_sample, sums)
        elif need[0]:
            dx = _cpu.region_norm_backward_dx(gy, x, m, gc, gmap, mu, rho, per_sample, sums)
        if maps:
            dg1, dg0, db1, db0 = dgm, None, dbm, None
        else:
            dg1, dg0 = _table_grads(dgc, g1, g0, need[2], need[3])
            db1, db0 = _table_grads(dbc, b1, b0, need[4], need[5])
        return dx, None, dg1, dg0, db1, db0, None, None, None


def _op_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, m, gc, bc, gmap, bmap, per_sample, eps = inputs
    _, mu, rho = output
    ctx.save_for_backward(x, m, gc, bc, gmap, bmap, mu, rho)
    ctx.cfg = (per_sample, eps)


def _op_backward(ctx, gy, *_unused):  # noqa: ANN001, ANN202
    """Autograd of ``torch.ops.normkit.region_norm``: the backward operator; a double backward
    differentiates the official formula with ``G = m·gc₁ + (1 − m)·gc₀`` (times gmap) and ``B`` alike."""
    x, m, gc, bc, gmap, bmap, mu, rho = ctx.saved_tensors
    per_sample, eps = ctx.cfg
    need = ctx.needs_input_grad  # (x, mask, gc, bc, gmap, bmap, per_sample, eps)
    if torch.is_grad_enabled():
        wants = (need[0], need[2], need[3], need[4], need[5])
        with torch.enable_grad():
            args = [None if t is None else t if t.requires_grad else t.detach().requires_grad_(w)
                    for t, w in zip((x, gc, bc, gmap, bmap), wants)]
            shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            g = m * args[1][:, 0].reshape(shape) + (1 - m) * args[1][:, 1].reshape(shape)
            b = m * args[2][:, 0].reshape(shape) + (1 - m) * args[2][:, 1].reshape(shape)
            g = g if args[3] is None else g * args[3]
            b = b if args[4] is None else b + args[4]
            y = _reference(args[0], m, g, None, b, None, eps, per_sample)
            live = [a for a, w in zip(args, wants) if a is not None and w]
            got = iter(torch.autograd.grad(y, live, gy, create_graph=True, allow_unused=True))
        dx, dgc, dbc, dgm, dbm = (next(got) if (a is not None and w) else None for a, w in zip(args, wants))
        return dx, None, dgc, dbc, dgm, dbm, None, None
    wants = (need[0], need[2], need[3], gmap is not None and need[4], bmap is not None and need[5])
    got = torch.ops.normkit.region_norm_backward(gy, x, m, gc, gmap, mu, rho, per_sample, *wants)
    dx, dgc, dbc, dgm, dbm = (t if w else None for t, w in zip(got, wants))
    return dx, None, dgc, dbc, dgm, dbm, None, None


_ops.region_norm.register_autograd(_op_backward, setup_context=_op_setup)


def _pair(a1: Tensor, a0: Tensor | None) -> Tensor:
    """Per-channel region-1 / region-0 values ``(1, C, 1)`` as one ``(1, C, 2)`` table."""
    return torch.cat([a1, a1 if a0 is None else a0], 2)


def _split(t: Tensor, a1: Tensor, a0: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The gradients of the per-channel parameters behind a ``(N|1, C, 2)`` table of region sums ``t``."""
    if a0 is None:
        return t.sum(2, keepdim=True).sum_to_size(a1.shape), None
    return t[..., :1].sum_to_size(a1.shape), t[..., 1:].sum_to_size(a0.shape)


class _MapConv(torch.autograd.Function):
    """``conv2d(s, w, b, padding=k // 2)`` for RN-L's few-channel maps (``(N, ≤2, H, W)``, one or two output
    channels): oneDNN's forward, a backward written as two more forward convolutions — ∂s is the
    convolution of ∂y with the flipped, transposed kernel, ∂w the convolution of ``s`` with ∂y taking
    the batch as the channel axis. oneDNN's own backward for so few channels measured 3–4× slower
    (41 vs 12 ms for a 1→2 7×7 conv at 32×56×56, one thread). The backward is made of differentiable
    ops, so a double backward works."""

    @staticmethod
    def forward(ctx, s: Tensor, w: Tensor, b: Tensor | None, kern: bool = False) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(s, w)
        ctx.has_bias = b is not None
        ctx.kern = kern and s.shape[0] > 0
        if ctx.kern:
            return _cpu.map_conv(s, w, b)
        return TF.conv2d(s, w, b, padding=w.shape[-1] // 2)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        s, w = ctx.saved_tensors
        pad = w.shape[-1] // 2
        db = g.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.kern and not torch.is_grad_enabled():  # csrc/region_norm.cpp's direct convolutions
            ds = _cpu.map_conv(g, w.flip(-1, -2).transpose(0, 1), None) if ctx.needs_input_grad[0] else None
            dw = _cpu.map_conv_weight_grad(s, g, w.shape[-1]) if ctx.needs_input_grad[1] else None
            return ds, dw, db, None
        ds = TF.conv2d(g, w.flip(-1, -2).transpose(0, 1), padding=pad) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1] and s.shape[0] == 0:  # an empty batch (a rank with no samples)
            dw = torch.zeros_like(w)
        elif ctx.needs_input_grad[1]:  # (Ci, N, H, W) ⋆ (Co, N, H, W) → (Ci, Co, k, k)
            dw = TF.conv2d(s.transpose(0, 1), g.transpose(0, 1), padding=pad).transpose(0, 1)
        return ds, dw, db, None
