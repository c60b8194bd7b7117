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
from normkit.stats import Reducer, SumSpec, accumulation_dtype, synced_sums
from normkit.sync import reduce_packed


def _check_groups(c: int, num_groups: int, what: str) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"{what}: num_groups={num_groups!r} must be a positive divisor of the {c} channels")
    return c // num_groups


def group_whitening(
    x: Tensor,
    num_groups: int,
    eps: float = 1e-5,
    *,
    exact: bool = False,
    per_sample: bool = False,
    reducer: Reducer | None = None,
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
        reducer: batch statistics over every process (:mod:`normkit.sync`; ignored with
            ``per_sample``), see :func:`group_moments`.
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "group_whitening")
    n = _check_groups(c, num_groups, "group_whitening")
    if x.dim() < 3:
        raise ValueError(f"group_whitening expects (N, C, *spatial) input, got shape {tuple(x.shape)}")
    v = x.to(accumulation_dtype(x.dtype)).reshape(x.shape[0], num_groups, n, trailing_numel(x))  # (N, G, n, L)
    mean, cov, centred = group_moments(v, eps, per_sample=per_sample, reducer=reducer, with_cov=True)
    out = centred
    if exact:
        work = torch.float64 if cov.dtype == torch.float32 else cov.dtype
        evals, evecs = torch.linalg.eigh(cov.to(work))
        inv_sqrt = evecs * evals.clamp_min(max(eps, torch.finfo(work).tiny)).rsqrt().unsqueeze(-2)
        out = ((inv_sqrt @ evecs.transpose(-1, -2)).to(v.dtype)) @ centred
    return out.reshape(x.shape).to(x.dtype), cov


def _check_positions(v: Tensor, per_sample: bool) -> int:
    """M, the positions per group (per sample: L; batch: N·L), checked ≥ 2 as a covariance needs (an empty
    batch gives an empty output)."""
    b, _, _, length = v.shape
    m = length if per_sample else b * length
    if m < 2 and v.numel():
        raise ValueError(f"group_whitening needs at least 2 positions per group to estimate a covariance, got M = {m}")
    return m


def group_moments(
    v: Tensor,
    eps: float,
    *,
    per_sample: bool = False,
    reducer: Reducer | None = None,
    with_cov: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(μ, cov, x − μ)`` of grouped features ``v`` ``(N, G, n, L)``.

    ``μ`` is ``(1, G, n, 1)`` (batch statistics over N·L) or ``(N, G, n, 1)`` (``per_sample``); ``cov`` the
    ridged unbiased covariance ``(G, n, n)`` / ``(N, G, n, n)`` of the official code, or None without
    ``with_cov`` (then the centred tensor is not formed either: the fast path of :func:`gdwct` needs
    only μ).

    ``reducer`` (batch statistics only): the sums of every process in ONE packed collective
    (:func:`normkit.stats.synced_sums`), taken about a shift ``K`` common to every process — the layer's
    synchronized mean of its previous call, kept by the module's reducer (on a first call the exact global
    mean from one more collective): the count, ``Σ(x−K)`` per channel and, with ``with_cov``, the
    per-group cross products ``Σ(x−K)(x−K)ᵀ``. With ``d = μ − K = Σ(x−K)/M`` the covariance is
    ``(Σ(x−K)(x−K)ᵀ − M·d dᵀ) / (M − 1)``, which loses only ``log10(|d|²/σ²)`` digits (none in steady
    state; raw sums about 0 would lose ``log10(μ²/σ²)``). Without ``with_cov`` only ``(M, Σ(x−K))`` is sent.
    """
    b, g, n, length = v.shape
    dims = (3,) if per_sample else (0, 3)
    if per_sample or reducer is None:
        mean = v.mean(dims, keepdim=True)
        m = _check_positions(v, per_sample)
        if not with_cov:
            return mean, None, None
        centred = v - mean
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        gram = centred @ centred.transpose(-1, -2)
        cov = (gram if per_sample else gram.sum(0)) / (m - 1) + eps * eye
        return mean, cov, centred
    if not with_cov:  # the mean alone: Σx has no cancellation, (M, Σx) is all it needs
        count, total = reduce_packed([v.new_full((1,), b * length), v.sum(dims)], reducer)
        return (total / count).reshape(1, g, n, 1), None, None
    (sums,) = synced_sums([SumSpec(v, (0, 3), gram=True)], reducer)
    count = sums.count.reshape(())
    if float(count.detach()) < 2:
        raise ValueError(f"group_whitening needs at least 2 positions per group over all processes, got {int(count)}")
    d = sums.s1 / count  # (1, G, n, 1): μ − K
    mean = sums.shift + d
    dv = d.reshape(g, n, 1)
    eye = torch.eye(n, dtype=v.dtype, device=v.device)
    cov = (sums.s2 - count * (dv @ dv.transpose(-1, -2))) / (count - 1) + eps * eye
    return mean, cov, v - mean


def coloring_matrix(s: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Official ``Get.coloring``: ``(X, U)`` from the style-predicted matrices ``S``, both ``(N, G, n, n)``.

    ``s``: ``(N, G·n·n)`` (the MLP output, row-major n×n blocks per group) or ``(N, G, n, n)``.
    ``D_j = ‖S_{:, j}‖₂`` (column norms), ``U = S / D``, ``X = S Uᵀ = U diag(D) Uᵀ``. A zero column gives
    a division by zero, as in the official code (no eps there). The column norms are computed from the
    column scaled by a power of two (exact), so they are right for entries far from 1 (1e±30 in float32).
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
    # ‖column‖ of the column scaled by an exact power of two near its largest entry, so a style code at
    # 1e±30 neither overflows nor underflows the squares (the official sqrt(Σs²) is inf / 0 there)
    # (torch.ldexp's backward is wrong for an integer exponent tensor: scale by multiplication)
    _, e = torch.frexp(s.detach().abs().amax(-2, keepdim=True))
    scale = torch.ldexp(torch.ones(e.shape, dtype=s.dtype, device=s.device), -e)
    d = torch.linalg.vector_norm(s * scale, dim=-2, keepdim=True) / scale
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
    with_cov: bool = True,
    reducer: Reducer | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """GDWCT of content ``x`` ``(N, C, *spatial)``; returns ``(y, cov, U)``.

    ``y = alpha · (X · whiten(x) + μ_style) + (1 − alpha) · x`` where ``X`` is block-diagonal with the
    G coloring matrices of :func:`coloring_matrix` (applied per group, equal to the official masked
    C×C product), ``coloring`` is ``(N, G·n·n)`` or ``(N, G, n, n)``, ``style_mean`` is ``(N, C)``.
    ``cov`` (:func:`group_whitening`) and ``U`` feed :func:`whitening_regularizer` and
    :func:`coloring_regularizer`; ``with_cov=False`` skips the covariance (returned as None).

    Implementation (official centring, ``exact=False``): the whole layer is one affine map per group,

        y = X'·x + b',   X' = alpha·X + (1 − alpha)·I,   b' = alpha·(μ_style − X·μ)

    computed by one batched ``matmul`` and an in-place add after one mean pass; autograd keeps
    only x and the (N, G, n, n) matrices (the centred tensor of the official code is formed only for
    ``cov``). Rounding: ``X·x − X·μ`` loses ``log10(|μ|/σ)`` digits against centring first (float32 at
    |μ| = 1e3·σ: ~1e-4 relative), the price of not storing a centred copy.

    ``reducer``: batch statistics (``per_sample=False``) over every process, one packed collective
    per call (:func:`group_moments`).
    """
    c = check_channels_first(x, None, "gdwct")
    n = _check_groups(c, num_groups, "gdwct")
    check_float(style_mean, "style_mean")
    if style_mean.shape != (x.shape[0], c) and style_mean.shape != (x.shape[0], c, 1, 1):
        raise ValueError(f"gdwct: style_mean must be (N={x.shape[0]}, C={c}), got {tuple(style_mean.shape)}")
    if coloring.shape[0] != x.shape[0]:
        raise ValueError(f"gdwct: coloring has batch {coloring.shape[0]} but x has {x.shape[0]}")
    if x.dim() < 3:
        raise ValueError(f"gdwct expects (N, C, *spatial) input, got shape {tuple(x.shape)}")
    mat, u = coloring_matrix(coloring, num_groups)
    b, length = x.shape[0], trailing_numel(x)
    sd = accumulation_dtype(x.dtype)
    mu_s = style_mean.reshape(b, num_groups, n, 1).to(sd)
    if exact:
        xw, cov = group_whitening(x, num_groups, eps, exact=True, per_sample=per_sample, reducer=reducer)
        colored = (mat.to(xw.dtype) @ xw.reshape(b, num_groups, n, length)).reshape(x.shape)
        return alpha * (colored + mu_s.reshape(x.shape[:2] + (1,) * (x.dim() - 2)).to(x.dtype)) + (1 - alpha) * x, cov, u
    eps = check_eps(eps)
    v = x.to(sd).reshape(b, num_groups, n, length)
    synced = reducer is not None and not per_sample
    cov = None
    if synced or with_cov:
        mean, cov, _ = group_moments(v, eps, per_sample=per_sample, reducer=reducer if synced else None, with_cov=with_cov)
    m = mat.to(sd)
    a = alpha.to(sd) if isinstance(alpha, Tensor) else alpha
    eye = torch.eye(n, dtype=sd, device=x.device)
    xp = torch.lerp(eye, m, a) if isinstance(a, Tensor) else a * m + (1 - a) * eye  # alpha·X + (1 − alpha)·I
    if synced:  # the synchronized mean's gradient runs through the collective: the generic path
        bp = a * (mu_s - m @ mean)
        y = _GroupAffine.apply(v, xp.expand(b, num_groups, n, n), bp.expand(b, num_groups, n, 1))
    else:
        dims = (3,) if per_sample else (0, 3)
        _check_positions(v, per_sample)
        y = _CentredGroupAffine.apply(v, xp.expand(b, num_groups, n, n), (a * m).expand(b, num_groups, n, n),
                                      (a * mu_s).expand(b, num_groups, n, 1), dims)
    return y.reshape(x.shape).to(x.dtype), cov, u


class _GroupAffine(torch.autograd.Function):
    """``y = A·v + c`` per (sample, group): ``v`` ``(N, G, n, L)``, ``A`` ``(N, G, n, n)``, ``c`` ``(N, G, n, 1)``.

    Written out so that autograd keeps only ``v`` (the caller's input, not a copy) and ``A``, and the
    ``c`` term costs an in-place add. The backward is made of differentiable ops on the saved tensors,
    so double backward works.
    """

    @staticmethod
    def forward(ctx, v: Tensor, a: Tensor, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, a)
        return torch.matmul(a, v).add_(c)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        v, a = ctx.saved_tensors
        dv = torch.matmul(a.transpose(-1, -2), gy) if ctx.needs_input_grad[0] else None
        da = torch.matmul(gy, v.transpose(-1, -2)) if ctx.needs_input_grad[1] else None
        dc = gy.sum(-1, keepdim=True) if ctx.needs_input_grad[2] else None
        return dv, da, dc


class _CentredGroupAffine(torch.autograd.Function):
    """``y = A·v + c − M·μ`` per (sample, group) with ``μ = mean(v)`` over ``dims`` (``(0, 3)``: batch and
    positions, the official statistics; ``(3,)``: per sample) taken inside: ``v`` ``(N, G, n, L)``,
    ``A``, ``M`` ``(N, G, n, n)``, ``c`` ``(N, G, n, 1)`` (GDWCT: ``A = alpha·X + (1 − alpha)·I``,
    ``M = alpha·X``, ``c = alpha·μ_style``).

    Why: with μ computed outside, autograd's mean backward writes an input-sized ``∂L/∂μ / count``
    tensor and adds it to ``∂L/∂v`` (two more passes over the input, ~1/4 of the layer's fwd+bwd at
    32×64×56×56). Here ``∂L/∂v = Aᵀ·∂L/∂y − (Σ Mᵀ·Σ_L ∂L/∂y) / count`` is one batched product and an
    in-place add of an (N, G, n, 1) term. Saves v (the caller's input, not a copy), A, M and μ. Double
    backward: with grad enabled the backward recomputes μ from v and uses differentiable ops only.
    """

    @staticmethod
    def forward(ctx, v: Tensor, a: Tensor, m: Tensor, c: Tensor, dims: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        mean = v.mean(dims, keepdim=True)
        ctx.dims = dims
        ctx.save_for_backward(v, a, m, mean)
        return torch.matmul(a, v).add_(c - m @ mean)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, a, m, mean = ctx.saved_tensors
        dims, grad_graph = ctx.dims, torch.is_grad_enabled()
        if grad_graph:  # create_graph=True: μ as a differentiable function of v
            mean = v.mean(dims, keepdim=True)
        need_v, need_a, need_m, need_c = ctx.needs_input_grad[:4]
        dc = gy.sum(-1, keepdim=True)  # (N, G, n, 1)
        dv = da = dm = None
        if need_v:
            dmean = -(m.transpose(-1, -2) @ dc)  # (N, G, n, 1)
            count = v.shape[-1]
            if 0 in dims:
                dmean, count = dmean.sum(0, keepdim=True), count * v.shape[0]
            dv = torch.matmul(a.transpose(-1, -2), gy)
            dv = dv + dmean / count if grad_graph else dv.add_(dmean / count)
        if need_a:
            da = torch.matmul(gy, v.transpose(-1, -2))
        if need_m:
            dm = -(dc @ mean.transpose(-1, -2))
        return dv, da, dm, (dc if need_c else None), None


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
