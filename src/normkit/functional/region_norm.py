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

import torch
import torch.nn.functional as TF
from torch import Tensor

from normkit.functional._core import channel_view, check_channels_first, check_eps, check_float, check_param
from normkit.stats import Reducer, accumulation_dtype, moments, reduced_moments
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
    return _rn_pair(x, m, eps, per_sample).to(x.dtype)


def _rn_pair(x: Tensor, m: Tensor, eps: float, per_sample: bool, reducer: Reducer | None = None) -> Tensor:
    xf = x.to(m.dtype)
    if reducer is not None and not per_sample:
        return _rn_synced(xf, m, eps, reducer) + _rn_synced(xf, 1 - m, eps, reducer)
    return _rn(xf, m, eps, per_sample) + _rn(xf, 1 - m, eps, per_sample)


def _rn_synced(xf: Tensor, m: Tensor, eps: float, reducer: Reducer) -> Tensor:
    """BN-style :func:`_rn` over every process's batch (:mod:`normkit.sync`): one collective for the
    region sums ``(n, Σm, Σx·m)``; the mean of the filled tensor z they give is the (common) shift of
    z's moments, a second collective."""
    dims = (0, *range(2, xf.dim()))
    region = xf * m
    n = 1
    for d in dims:
        n *= xf.shape[d]
    cnt, s_raw, rs = reduce_packed([xf.new_full((1,), n), m.sum(dims, keepdim=True), region.sum(dims, keepdim=True)], reducer)
    s = torch.where(s_raw == 0, torch.ones_like(s_raw), s_raw)  # official: Sr[Sr == 0] = 1
    mu = rs / s
    z = region + (1 - m) * mu
    shift = (rs + mu * (cnt - s_raw)) / cnt  # Σz / n for a binary mask (any common value would do)
    zr = reduced_moments(z, dims, reducer=reducer, shift=shift)
    return (z - zr.mean) * torch.rsqrt(zr.var + eps) * torch.sqrt(s / cnt)


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
    r = _rn_pair(x, m, eps, per_sample, reducer)

    def affine(gamma: Tensor | None, beta: Tensor | None, region: Tensor) -> Tensor:
        y = r * region
        if gamma is not None:
            y = y * (1 + channel_view(gamma, r).to(r.dtype))
        if beta is not None:
            b = channel_view(beta, r).to(r.dtype)
            y = y + (b * region if masked_bias else b)
        return y

    return (affine(foreground_gamma, foreground_beta, m) + affine(background_gamma, background_beta, 1 - m)).to(x.dtype)


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
    pooled = torch.cat([x4.mean(1, keepdim=True), x4.amax(1, keepdim=True)], dim=1)
    s = torch.sigmoid(TF.conv2d(pooled, sa_weight, None, padding=sa_weight.shape[-1] // 2))
    gamma = TF.conv2d(s, gamma_weight, gamma_bias, padding=gamma_weight.shape[-1] // 2)
    beta = TF.conv2d(s, beta_weight, beta_bias, padding=beta_weight.shape[-1] // 2)
    m = (s.detach() >= threshold).to(accumulation_dtype(x.dtype))
    r = _rn_pair(x4, m, eps, per_sample, reducer)
    y = r * (1 + gamma.to(r.dtype)) + beta.to(r.dtype)
    return (y.squeeze(-1) if x.dim() == 3 else y).to(x.dtype)
