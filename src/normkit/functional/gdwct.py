"""Group-wise Deep Whitening-and-Coloring Transformation (GDWCT).

Cho, Choi, Park, Shin & Choo, "Image-to-Image Translation via Group-wise Deep Whitening-and-Coloring
Transformation", CVPR 2019, arXiv:1812.09912. Official code ``WonwoongCho/GDWCT`` (commit 2c58934):
``model.py`` (``WCT.wct``, ``Get.coloring``) and ``run.py::reg``.

The C channels are split into G groups of n = C / G. Per group:

* **whitening** — in the official code (and the paper's "deep whitening") only the *centring* is
  applied, ``x̄ = x − μ`` with μ per channel over the batch and the positions (B·H·W); the network is
  pushed towards whitened features by the regulariser ``mean|Σ − I|`` on the group covariance
  ``Σ = x̄ x̄ᵀ / (B·H·W − 1) + eps·I``. ``exact=True`` instead applies the classic ZCA whitening
  ``Σ^{-1/2} x̄`` (an extension, not the paper's method; see :func:`group_whitening`).
* **coloring** — a matrix ``S_i`` (n×n) predicted from the style code is split into column norms
  ``D = ‖S_{:,j}‖₂`` and directions ``U = S / D`` and the coloring matrix is ``X_i = S_i U_iᵀ = U D Uᵀ``.
  The coloring regulariser is ``mean|U − I|`` in the code (the paper describes the orthogonality
  constraint ``UᵀU ≈ I``; ``paper_exact=True``).
* **output** — ``alpha · (X · x̄ + μ_style) + (1 − alpha) · x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.functional._core import check_channels_first, check_eps, check_float, trailing_numel
from normkit.stats import accumulation_dtype


def _check_groups(c: int, num_groups: int, what: str) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"{what}: num_groups={num_groups!r} must be a positive divisor of the {c} channels")
    return c // num_groups


def group_whitening(
    x: Tensor, num_groups: int, eps: float = 1e-5, *, exact: bool = False, per_sample: bool = False
) -> tuple[Tensor, Tensor]:
    """Group-wise (deep) whitening of an ``(N, C, *spatial)`` tensor; returns ``(whitened, cov)``.

    ``cov`` is the per-group covariance of the centred features, ``x̄ x̄ᵀ / (M − 1) + eps·I`` (unbiased,
    with the eps ridge, exactly the official ``cov_c``), shaped ``(G, n, n)`` or ``(N, G, n, n)`` with
    ``per_sample=True``; feed it to :func:`whitening_regularizer`.

    Args:
        exact: ``False`` (official code, the paper's *deep* whitening): only centre, ``x̄ = x − μ``.
            ``True``: ZCA whitening ``cov^{-1/2} x̄`` through a symmetric eigendecomposition of the
            ridged covariance (eigenvalues clamped at eps; computed in float64 for float32 input), so
            the whitened group has covariance ``Σ(Σ + eps·I)^{-1} ≈ I``. Its gradient is unstable when
            two eigenvalues (nearly) coincide — the usual caveat of eigendecomposition backward.
        per_sample: ``False`` (official): statistics over the batch and the positions (M = N·H·W), so
            the output depends on the other samples of the batch, also in eval. ``True``: per-sample
            statistics (M = H·W).
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "group_whitening")
    n = _check_groups(c, num_groups, "group_whitening")
    if x.dim() < 3:
        raise ValueError(f"group_whitening expects (N, C, *spatial) input, got shape {tuple(x.shape)}")
    xf = x.to(accumulation_dtype(x.dtype))
    b, length = x.shape[0], trailing_numel(x)
    if per_sample:
        v = xf.reshape(b, num_groups, n, length)  # (N, G, n, L)
    else:
        v = xf.reshape(b, c, length).transpose(0, 1).reshape(1, num_groups, n, b * length)  # (1, G, n, N·L)
    m = v.shape[-1]
    if m < 2 and x.numel():  # an empty batch gives an empty output
        raise ValueError(
            f"group_whitening needs at least 2 positions per group to estimate a covariance, got shape {tuple(x.shape)}"
        )
    centred = v - v.mean(-1, keepdim=True)
    eye = torch.eye(n, dtype=v.dtype, device=v.device)
    cov = centred @ centred.transpose(-1, -2) / (m - 1) + eps * eye
    out = centred
    if exact:
        work = torch.float64 if cov.dtype == torch.float32 else cov.dtype
        evals, evecs = torch.linalg.eigh(cov.to(work))
        inv_sqrt = evecs * evals.clamp_min(max(eps, torch.finfo(work).tiny)).rsqrt().unsqueeze(-2)
        out = ((inv_sqrt @ evecs.transpose(-1, -2)).to(v.dtype)) @ centred
    if per_sample:
        y = out.reshape(x.shape)
    else:
        y = out.reshape(c, b, length).transpose(0, 1).reshape(x.shape)
        cov = cov.squeeze(0)
    return y.to(x.dtype), cov


def coloring_matrix(s: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Official ``Get.coloring``: ``(X, U)`` from the style-predicted matrices ``S``, both ``(N, G, n, n)``.

    ``s``: ``(N, G·n·n)`` (the MLP output, row-major n×n blocks per group) or ``(N, G, n, n)``.
    ``D_j = ‖S_{:, j}‖₂`` (column norms), ``U = S / D``, ``X = S Uᵀ = U diag(D) Uᵀ``. A zero column gives
    a division by zero, as in the official code (no eps there).
    """
    check_float(s, "s")
    b = s.shape[0] if s.dim() >= 1 else 0
    if s.dim() == 2:
        n2, rem = divmod(s.shape[1], num_groups)
        n = int(round(n2**0.5))
        if rem or n * n != n2:
            raise ValueError(f"coloring_matrix: s of shape {tuple(s.shape)} is not (N, G·n·n) with G={num_groups}")
        s = s.reshape(b, num_groups, n, n)
    if s.dim() != 4 or s.shape[1] != num_groups or s.shape[2] != s.shape[3]:
        raise ValueError(f"coloring_matrix expects s of shape (N, G·n·n) or (N, G={num_groups}, n, n), got {tuple(s.shape)}")
    d = s.square().sum(-2, keepdim=True).sqrt()
    u = s / d
    return s @ u.transpose(-1, -2), u


def gdwct(
    x: Tensor,
    coloring: Tensor,
    style_mean: Tensor,
    alpha: Tensor | float,
    num_groups: int,
    eps: float = 1e-5,
    *,
    exact: bool = False,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """GDWCT of content ``x`` ``(N, C, *spatial)``; returns ``(y, cov, U)``.

    ``y = alpha · (X · whiten(x) + μ_style) + (1 − alpha) · x`` where ``X`` is block-diagonal with the
    G coloring matrices of :func:`coloring_matrix` (applied per group, equal to the official masked
    C×C product), ``coloring`` is ``(N, G·n·n)`` or ``(N, G, n, n)``, ``style_mean`` is ``(N, C)``.
    ``cov`` (:func:`group_whitening`) and ``U`` feed :func:`whitening_regularizer` and
    :func:`coloring_regularizer`.
    """
    c = check_channels_first(x, None, "gdwct")
    n = _check_groups(c, num_groups, "gdwct")
    check_float(style_mean, "style_mean")
    if style_mean.shape != (x.shape[0], c) and style_mean.shape != (x.shape[0], c, 1, 1):
        raise ValueError(f"gdwct: style_mean must be (N={x.shape[0]}, C={c}), got {tuple(style_mean.shape)}")
    if coloring.shape[0] != x.shape[0]:
        raise ValueError(f"gdwct: coloring has batch {coloring.shape[0]} but x has {x.shape[0]}")
    xw, cov = group_whitening(x, num_groups, eps, exact=exact, per_sample=per_sample)
    mat, u = coloring_matrix(coloring, num_groups)
    b = x.shape[0]
    colored = (mat.to(xw.dtype) @ xw.reshape(b, num_groups, n, trailing_numel(x))).reshape(x.shape)
    mu = style_mean.reshape((b, c) + (1,) * (x.dim() - 2)).to(x.dtype)
    return alpha * (colored + mu) + (1 - alpha) * x, cov, u


def whitening_regularizer(cov: Tensor) -> Tensor:
    """``mean|Σ − I|`` over the group covariances (official ``run.py::reg``; λ_w = 1e-3 in the config).

    The paper writes the sum ``Σ_i ‖Σ_i − I‖₁,₁``; the code averages over all entries.
    """
    check_float(cov, "cov")
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"whitening_regularizer expects (..., n, n) covariances, got {tuple(cov.shape)}")
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return (cov - eye).abs().mean()


def coloring_regularizer(u: Tensor, *, paper_exact: bool = False) -> Tensor:
    """Coloring regulariser on the column-normalized matrices ``U`` (official λ_c = 10).

    ``paper_exact=False`` (official ``run.py::reg``): ``mean|U − I|``, which pushes ``U`` itself toward
    the identity. ``paper_exact=True``: the orthogonality constraint the paper describes,
    ``mean|UᵀU − I|``.
    """
    check_float(u, "U")
    if u.dim() < 2 or u.shape[-1] != u.shape[-2]:
        raise ValueError(f"coloring_regularizer expects (..., n, n) matrices, got {tuple(u.shape)}")
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    m = u.transpose(-1, -2) @ u if paper_exact else u
    return (m - eye).abs().mean()
