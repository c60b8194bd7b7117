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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor

from normkit.functional._core import check_channels_first, check_eps, check_float, check_param
from normkit.stats import Reducer, accumulation_dtype, moments, rescue_scale
from normkit.sync import reduce_packed


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
    per_sample: bool, reducer: Reducer | None = None,
) -> Tensor:
    """``y = rn·G + B`` with ``rn = region_normalize(x, m)`` and the scale/shift chosen per region:
    ``G = m·g1 + (1 − m)·g0`` (``g0`` None: ``g1`` everywhere), ``B`` likewise; ``g*``/``b*`` broadcast to
    x, per channel ``(1, C, 1, …)`` or a spatial map ``(N, 1, *spatial)``. Returns the accumulation dtype.

    Binary masks in eager code without a reducer take :class:`_RegionNormFn` (two passes of statistics,
    one output pass, closed-form backward, saves only x and the mask); soft masks, ``torch.compile``
    and synchronized statistics take the official formula (:func:`_reference`)."""
    xf = x.to(m.dtype)
    n, c = x.shape[:2]
    if (reducer is None and not torch.compiler.is_compiling() and xf.numel() > 0
            and bool(((m == 0) | (m == 1)).all())):
        length = xf[0, 0].numel()

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(t.shape[0], t.shape[1], -1)  # (1, C, 1) or (N, 1, L)

        def ref(x3: Tensor, m3: Tensor, *p: Tensor | None) -> Tensor:
            return _reference(x3, m3, *p, eps, per_sample)

        y = _RegionNormFn.apply(
            xf.reshape(n, c, length), m.reshape(n, m.shape[1], length), flat(g1), flat(g0), flat(b1), flat(b0),
            eps, per_sample, ref,
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
    ONE packed collective of the per-channel sums ``(n, Σm, Σx·m, Σx, Σx²·m, Σx²)``. The region variances
    are ``Σx²/S − μ²`` (this loses ``log10(μ_r²/σ_r²)`` digits to cancellation, the price of one
    collective: there is no running mean to shift by); binary masks (RN-L's always are) give the
    official values, soft masks the separately-normalized regions' values."""
    dims = (0, *range(2, xf.dim()))
    n = 1
    for d in dims:
        n *= xf.shape[d]
    inside = m != 0
    zero = xf.new_zeros(())
    xm = torch.where(inside, xf, zero)  # a NaN stays in its own region
    xo = torch.where(inside, zero, xf)
    cnt, s1, t1, t0, q1, q0 = reduce_packed([
        xf.new_full((1,), n), m.sum(dims, keepdim=True).expand(1, xf.shape[1], *([1] * (xf.dim() - 2))),
        xm.sum(dims, keepdim=True), xo.sum(dims, keepdim=True),
        (xm * xm).sum(dims, keepdim=True), (xo * xo).sum(dims, keepdim=True),
    ], reducer)
    out = torch.zeros_like(xf)
    for region, s_raw, t, q in ((inside, s1, t1, q1), (~inside, cnt - s1, t0, q0)):
        s = torch.where(s_raw == 0, torch.ones_like(s_raw), s_raw)  # official: Sr[Sr == 0] = 1
        mu = t / s
        var = (q / s - mu * mu).clamp_min(0)
        out = torch.where(region, (xf - mu) * torch.rsqrt(var + eps * cnt / s), out)
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
    pooled = _MeanMax.apply(x4)
    s = torch.sigmoid(TF.conv2d(pooled, sa_weight, None, padding=sa_weight.shape[-1] // 2))
    gamma = TF.conv2d(s, gamma_weight, gamma_bias, padding=gamma_weight.shape[-1] // 2)
    beta = TF.conv2d(s, beta_weight, beta_bias, padding=beta_weight.shape[-1] // 2)
    sd = accumulation_dtype(x.dtype)
    m = (s.detach() >= threshold).to(sd)
    y = _region_affine(x4, m, 1 + gamma.to(sd), None, beta.to(sd), None, eps, per_sample, reducer)
    return (y.squeeze(-1) if x.dim() == 3 else y).to(x.dtype)


# ---------------------------------------------------------------- fast path (binary masks, eager)

#: elements per slab: the fast path walks the batch in slabs of about this many values (16 MiB of
#: float32), so each phase's elementwise temporaries are slab-sized instead of full-size buffers; large
#: enough that the number of op calls stays small (on a loaded 2-core machine every parallel op call
#: can wait a scheduler slice: 1 MiB slabs measured several times slower there)
_SLAB = 1 << 22


def _slabs(n: int, per_sample: int) -> list[slice]:
    step = max(1, _SLAB // max(per_sample, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _at(t: Tensor, sl: slice) -> Tensor:
    return t[sl] if t.shape[0] > 1 else t


class _Regions:
    """A binary float mask ``m`` ``(N, 1|C, L)`` prepared for the fast path: its complement, the
    per-position choice between two per-region values, and per-region row sums."""

    def __init__(self, m: Tensor) -> None:
        self.m, self.m0 = m, 1 - m
        # one channel: both regions' sums of a slab as one batched product (N, C, L) @ (N, L, 2)
        self.mt = torch.stack([m[:, 0], self.m0[:, 0]], -1) if m.shape[1] == 1 else None

    def sel(self, a1: Tensor, a0: Tensor, sl: slice) -> Tensor:
        """``a1`` where m = 1, ``a0`` where m = 0 (exact: one product is 0, the other ``a·1``); about 25× faster
        on CPU than a broadcasting ``torch.where`` or ``torch.lerp`` (0.19 vs 4.9 ms for 5×64×3136, one thread)."""
        return (_at(a0, sl) * self.m0[sl]).addcmul_(_at(a1, sl), self.m[sl])

    def sums(self, t: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        """Per-row sums of a slab ``t`` ``(n, C, L)`` over each region: ``(Σ m·t, Σ (1 − m)·t)``, each ``(n, C, 1)``."""
        if self.mt is not None:
            r = torch.bmm(t, self.mt[sl])
            return r[..., :1], r[..., 1:]
        return (t * self.m[sl]).sum(2, keepdim=True), (t * self.m0[sl]).sum(2, keepdim=True)


class _MeanMax(torch.autograd.Function):
    """``[mean_c(x), max_c(x)]`` ``(N, 2, *spatial)``, RN-L's pooled input (official ``torch.mean`` and
    ``torch.max(x, dim=1)``, whose gradient goes to the arg-max channel). Backward writes ∂x once (the
    mean's share broadcast, the max's added at the saved indices) instead of autograd's chain of
    full-size temporaries for ``mean`` and ``amax``; saves only the (N, 1, *spatial) indices."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        mx, idx = x.max(1, keepdim=True)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return torch.cat([x.mean(1, keepdim=True), mx], 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        dx = (g[:, :1] / ctx.shape[1]).expand(ctx.shape).contiguous()
        return dx.scatter_add(1, idx, g[:, 1:]) if torch.is_grad_enabled() else dx.scatter_add_(1, idx, g[:, 1:])


class _RegionStats:
    """Region statistics of ``x`` ``(N, C, L)`` under a binary mask: per region r (1: m = 1, 0: m = 0)
    and channel (and sample with ``per_sample``) the count ``S_r``, mean ``μ_r`` and
    ``ρ_r = 1/sqrt(σ_r² + eps·count/S_r)`` (σ_r² biased), shaped ``(N|1, C, 1)``. Two passes over x (sums,
    then squared deviations from the region mean: no cancellation); where the squares overflow
    (|x| ≳ 1e19 in float32) the second pass is redone on x scaled by 2^−70 (exact), as
    :func:`normkit.kernels.canonical.safe_rstd`."""

    def __init__(self, x: Tensor, rg: _Regions, eps: float, per_sample: bool) -> None:
        n, c, length = x.shape
        self.rg = rg
        self.slabs = _slabs(n, c * length)
        count = length if per_sample else n * length
        self.total = (lambda t: t) if per_sample else (lambda t: t.sum(0, keepdim=True))
        s1 = self.total(rg.m.sum(2, keepdim=True)).expand(-1, c, -1)
        self.s1, self.s0 = s1.clamp_min(1), (count - s1).clamp_min(1)  # official: S[S == 0] = 1 (an empty region)
        t1, t0 = self.region_sums(lambda sl: x[sl])
        self.mu1, self.mu0 = t1 / self.s1, t0 / self.s0
        self.finite = math.isfinite((t1 + t0).sum().item())
        if not self.finite:  # NaN/inf input: the caller takes the reference path
            return
        v1, v0 = self.region_sums(lambda sl: self.centred(x, sl).square_())
        e1, e0 = eps * count / self.s1, eps * count / self.s0
        self.rho1, self.rho0 = torch.rsqrt(v1 / self.s1 + e1), torch.rsqrt(v0 / self.s0 + e0)
        if not math.isfinite((v1 + v0).sum().item()):
            c_ = rescue_scale(x.dtype)
            w1, w0 = self.region_sums(lambda sl: self.centred(x, sl, c_).square_())
            self.rho1 = torch.where(torch.isfinite(v1), self.rho1, torch.rsqrt(w1 / self.s1) * c_)
            self.rho0 = torch.where(torch.isfinite(v0), self.rho0, torch.rsqrt(w0 / self.s0) * c_)

    def region_sums(self, slab) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        """``(Σ_region1, Σ_region0)`` of ``slab(sl)`` over the statistics' axes, ``(N|1, C, 1)`` each; ``slab``
        may return a list of tensors, whose sums are then concatenated along the channels."""
        p1, p0 = [], []
        for sl in self.slabs:
            ts = slab(sl)
            parts = [self.rg.sums(t, sl) for t in (ts if isinstance(ts, list) else [ts])]
            p1.append(torch.cat([p[0] for p in parts], 1))
            p0.append(torch.cat([p[1] for p in parts], 1))
        return self.total(torch.cat(p1)), self.total(torch.cat(p0))

    def centred(self, x: Tensor, sl: slice, scale: float = 1.0) -> Tensor:
        """``(x − μ_r)·scale`` on one slab (a fresh tensor)."""
        mu = self.rg.sel(self.mu1, self.mu0, sl)
        if scale != 1.0:
            return torch.sub(x[sl] * scale, mu.mul_(scale))
        return torch.sub(x[sl], mu, out=mu) if mu.shape == x[sl].shape else x[sl] - mu

    def normalized(self, x: Tensor, sl: slice) -> Tensor:
        """``rn = (x − μ_r)·ρ_r`` on one slab."""
        return self.centred(x, sl).mul_(self.rg.sel(self.rho1, self.rho0, sl))


class _RegionNormFn(torch.autograd.Function):
    """``y = rn·G_r + B_r`` with ``rn`` the region normalization of ``x`` (see :class:`_RegionStats`).

    ``g1``/``g0`` (scale inside / outside the region) and ``b1``/``b0`` broadcast to x ``(N, C, L)``: per
    channel ``(1, C, 1)`` for RN-B, a spatial map ``(N, 1, L)`` for RN-L; ``g0``/``b0`` None means the
    same tensor as ``g1``/``b1``. Closed-form backward per region (BatchNorm's, with the region's means):

        ∂x = ρ_r·(ĝ − mean_r(ĝ) − rn·mean_r(ĝ·rn)),   ĝ = ∂y·G_r

    Saves only x, the mask and the O(C) statistics (plus G when it is a map); every elementwise
    intermediate is recomputed slab by slab. Double backward recomputes through the reference formula.
    """

    @staticmethod
    def forward(ctx, x, m, g1, g0, b1, b0, eps, per_sample, reference):  # noqa: ANN001, ANN205
        rg = _Regions(m)
        st = _RegionStats(x, rg, eps, per_sample)
        ctx.save_for_backward(x, m, g1, g0, b1, b0)
        ctx.cfg = (eps, per_sample, reference)
        ctx.st = st if st.finite else None
        if not st.finite:  # NaN or inf in x: the official formula (a NaN stays in its own region)
            with torch.no_grad():
                return reference(x, m, g1, g0, b1, b0)
        y = torch.empty_like(x)
        for sl in st.slabs:
            rn = st.normalized(x, sl)
            g = _at(g1, sl) if g0 is None else rg.sel(g1, g0, sl)
            b = _at(b1, sl) if b0 is None else rg.sel(b1, b0, sl)
            torch.add(rn.mul_(g), b, out=y[sl])
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, m, g1, g0, b1, b0 = ctx.saved_tensors
        eps, per_sample, reference = ctx.cfg
        need = ctx.needs_input_grad
        st: _RegionStats | None = ctx.st
        if st is None or torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            wants = (need[0], *need[2:6])
            create = torch.is_grad_enabled()
            with torch.enable_grad():
                # double backward differentiates through the saved inputs themselves (connected to the
                # outer graph); a plain backward (non-finite input) through detached copies
                args = [None if t is None else t if create else t.detach().requires_grad_(w)
                        for t, w in zip((x, g1, g0, b1, b0), wants)]
                y = reference(args[0], m, *args[1:])
                live = [a for a, w in zip(args, wants) if a is not None and w]
                got = iter(torch.autograd.grad(y, live, gy, create_graph=create, allow_unused=True))
            out = [next(got) if (a is not None and w) else None for a, w in zip(args, wants)]
            return out[0], None, out[1], out[2], out[3], out[4], None, None, None
        rg = st.rg
        g_map, b_map = g1.shape[2] > 1, b1.shape[2] > 1  # RN-L's spatial maps (N, 1, L); RN-B's (1, C, 1)
        gmaps, bmaps = [], []

        def pass1(sl: slice) -> list[Tensor]:
            # per slab: ∂y, ∂y·rn and (maps) ĝ, ĝ·rn, whose region sums come back stacked along C
            gs = gy[sl]
            q = st.normalized(x, sl).mul_(gs)  # ∂y·rn
            if b_map:
                bmaps.append(gs.sum(1, keepdim=True))
            if not g_map:
                return [gs, q]
            gm = _at(g1, sl)
            gmaps.append(q.sum(1, keepdim=True))
            return [gs, q, gs * gm, q * gm]

        c = x.shape[1]
        r1, r0 = st.region_sums(pass1)
        gsum1, gsum0 = r1[:, :c], r0[:, :c]  # Σ_r ∂y
        q1, q0 = r1[:, c:2 * c], r0[:, c:2 * c]  # Σ_r ∂y·rn
        if g_map:
            h1, h0, k1, k0 = r1[:, 2 * c:3 * c], r0[:, 2 * c:3 * c], r1[:, 3 * c:], r0[:, 3 * c:]
        else:  # G is constant per region and channel: Σ_r ĝ = G_r·Σ_r ∂y
            gg0 = g1 if g0 is None else g0
            h1, h0, k1, k0 = g1 * gsum1, gg0 * gsum0, g1 * q1, gg0 * q0
        c2_1, c2_0, c3_1, c3_0 = h1 / st.s1, h0 / st.s0, k1 / st.s1, k0 / st.s0
        dx = None
        if need[0]:
            dx = torch.empty_like(x)
            for sl in st.slabs:
                rn = st.normalized(x, sl)
                g = _at(g1, sl) if g0 is None else rg.sel(g1, g0, sl)
                gh = gy[sl] * g
                gh.sub_(rg.sel(c2_1, c2_0, sl)).sub_(rn.mul_(rg.sel(c3_1, c3_0, sl)))
                torch.mul(gh, rg.sel(st.rho1, st.rho0, sl), out=dx[sl])
        dg1 = dg0 = db1 = db0 = None
        if g_map:
            dg1 = torch.cat(gmaps).sum_to_size(g1.shape) if need[2] else None
        elif g0 is None:
            dg1 = (q1 + q0).sum_to_size(g1.shape) if need[2] else None
        else:
            dg1 = q1.sum_to_size(g1.shape) if need[2] else None
            dg0 = q0.sum_to_size(g0.shape) if need[3] else None
        if b_map:
            db1 = torch.cat(bmaps).sum_to_size(b1.shape) if need[4] else None
        elif b0 is None:
            db1 = (gsum1 + gsum0).sum_to_size(b1.shape) if need[4] else None
        else:
            db1 = gsum1.sum_to_size(b1.shape) if need[4] else None
            db0 = gsum0.sum_to_size(b0.shape) if need[5] else None
        return dx, None, dg1, dg0, db1, db0, None, None, None
