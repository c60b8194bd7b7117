"""Compressed RMSNorm and the exact Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversions.

Jiang, Gu, Zhu, Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient
Pre-LN Transformers", NeurIPS 2023, arXiv:2305.14858. Official code:
``ZixuanJiang/pre-rmsnorm-transformer`` (``example.py``, ``torch/customized_layer.py``).

The idea: if everything written into a transformer's residual stream has zero mean over the
hidden dim d, LayerNorm equals RMSNorm (the mean is already 0). A zero-mean d-vector is fully
described by its first d−1 coordinates (the last is minus their sum), so the residual stream
can be stored compressed in d−1 dims, and CRMSNorm computes the RMSNorm of the implied
d-vector from the compressed one. Conversions (LN without affine — fold γ, β into the next
linear first with :func:`fold_ln_affine`):

* residual-stream **writers** (patch/token embedding, position embedding, cls token, attention
  and MLP output projections): :func:`center_writer` (LN → RMSNorm), then :func:`compress_writer`
  (RMSNorm → CRMSNorm);
* residual-stream **readers** (QKV, MLP-in and head projections that follow a norm):
  unchanged for RMSNorm, :func:`compress_reader` for CRMSNorm.

Activations: :func:`compress_zero_mean` / :func:`decompress` map a zero-mean d-vector to its
d−1 compressed form and back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd import Function

from normkit import backend as B
from normkit.functional._closed_form import route
from normkit.functional._core import check_eps, check_float, check_param
from normkit.functional._replay import replay_grads
from normkit.stats import accumulation_dtype, rescue_scale


def _rstd(x2: Tensor, s: Tensor, q: Tensor, eps: float) -> Tensor:
    """``1/sqrt((q + s²)/d + eps)`` per row of ``x2`` ``(rows, d−1)``, with ``s = Σx``, ``q = Σx²``.

    Where that overflows the float range (|x| past ~1e19 in float32) the row is recomputed from
    ``x·c`` with ``c = 2^−(max_exp/2 + 6)`` (exact; see :func:`normkit.kernels.canonical.safe_rstd`):
    ``r = c / sqrt((Σ(cx)² + (Σcx)²)/d)`` (eps ≪ the sum there, dropped). Eager CPU code checks the
    rows with one reduction and a host read and rescues only when needed; compiled code and other
    devices select branch-free. NaN rows stay NaN; an inf entry gives NaN there and 0 in its row's finite
    entries (x / sqrt(inf)), IEEE arithmetic on the formula as ``torch.nn.functional.rms_norm``.
    """
    d = x2.shape[-1] + 1
    ms = (q + s * s) / d
    if not torch.compiler.is_compiling() and ms.is_cpu and math.isfinite(ms.sum().item()):
        return torch.rsqrt(ms + eps)
    c = rescue_scale(ms.dtype)
    xs = x2.to(ms.dtype) * c
    ss = xs.sum(-1, keepdim=True)
    scaled = (xs.square().sum(-1, keepdim=True) + ss * ss) / d
    bad = ~torch.isfinite(ms)
    r = torch.rsqrt(torch.where(bad, 1.0, ms) + eps)
    return torch.where(bad, torch.rsqrt(torch.where(bad, scaled, 1.0)) * c, r)


def _crms_math(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, sd: torch.dtype) -> Tensor:
    """The plain formula (autograd through it): the compiled backends' path and the double-backward replay."""
    xf = x.to(sd)
    s = xf.sum(-1, keepdim=True)
    q = xf.square().sum(-1, keepdim=True)
    y = xf * _rstd(xf, s, q, eps)
    if weight is not None:
        y = y * weight.to(sd)
    if bias is not None:
        y = y + bias.to(sd)
    return y.to(x.dtype)


class _CRMSNormFn(Function):
    """CRMSNorm on ``(rows, d−1)`` with a closed-form backward that saves x and two numbers per row.

    With r = (Σx² + (Σx)²)/d + eps)^−½ per row, ŷ = x·r, t = ∂L/∂y · w::

        ∂L/∂x = r · (t − u·(x·r) − u·(s·r)),   u = r · Σ_j t_j x_j / d,   s = Σ x
        ∂L/∂w = Σ_rows ∂L/∂y · ŷ,   ∂L/∂b = Σ_rows ∂L/∂y

    (∂r/∂x_j = −r³(x_j + s)/d). Every intermediate is O(1) for any input scale (r·x, r·s, r·Σtx),
    so an input at 1e30 neither overflows nor underflows in the backward.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, eps, sd):  # type: ignore[override]
        xf = x2.to(sd)
        s = xf.sum(-1, keepdim=True)
        q = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_()
        r = _rstd(xf, s, q, eps)
        y = xf * r
        if weight is not None:
            y.mul_(weight.to(sd))
        if bias is not None:
            y.add_(bias.to(sd))
        ctx.cfg = (eps, sd)
        ctx.save_for_backward(x2, weight, bias, r, s)
        return y.to(x2.dtype)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x2, weight, bias, r, s = ctx.saved_tensors
        eps, sd = ctx.cfg
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: autograd through the plain formula
            grads = replay_grads(lambda x, w, b: _crms_math(x, w, b, eps, sd), (x2, weight, bias), needs[:3], gy)
            return (*grads, None, None)
        d = x2.shape[-1] + 1
        xf, g = x2.to(sd), gy.to(sd)
        gw = None
        if weight is not None and needs[1]:
            gw = torch.mv(torch.mul(g, xf).t(), r.reshape(-1)).to(weight.dtype)
        gb = g.sum(0).to(bias.dtype) if bias is not None and needs[2] else None
        if not needs[0]:
            return None, gw, gb, None, None
        t = g if weight is None else g * weight.to(sd)
        u = torch.matmul(t.unsqueeze(-2), xf.unsqueeze(-1)).reshape(r.shape).mul_(r).div_(d)
        dx = torch.addcmul(t, xf, u * r, value=-1.0) if t is g else t.addcmul_(xf, u * r, value=-1.0)
        dx = dx.sub_(u * (s * r)).mul_(r)
        return dx.to(x2.dtype), gw, gb, None, None


def crms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Compressed RMSNorm over the last dim of ``x`` (width ``d − 1``, representing a zero-mean d-vector).

    Jiang et al. 2023, arXiv:2305.14858 (CRMSNorm); official ``crms_norm``::

        d = x.shape[-1] + 1
        y = x / sqrt((Σ_i x_i² + (Σ_i x_i)²) / d + eps)

    i.e. RMSNorm of the decompressed vector ``[x, −Σx]`` restricted to its first d−1 entries:
    ``crms_norm(x) == rms_norm(decompress(x))[..., :-1]`` (same eps). The paper's norm has no
    affine (γ, β are folded into the next linear layer); ``weight``/``bias`` of size d−1 are an
    optional plain per-feature affine on top (not an LN gain). eps 1e-5 as the official code
    (``nn.LayerNorm`` default); statistics in float32 for half inputs (official: ``x.float()``).

    The default path (``"auto"`` from 64K elements, ``"kernels"``/``"native"`` at any size; float32/64
    contiguous input) is one autograd node with a closed-form backward (:class:`_CRMSNormFn`: saves x
    and two numbers per row); ``"eager"``, small inputs on ``"auto"``, ``"compiled"``/``"inductor"``
    and code under ``torch.compile`` run the plain formula (:func:`normkit.functional._closed_form.route`).
    Inputs past ~1e19 (float32) keep their exact output on both (:func:`_rstd`).
    """
    check_float(x)
    eps = check_eps(eps)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"crms_norm expects input (*, d-1) with d-1 >= 1 compressed features, got {tuple(x.shape)}")
    check_param(weight, x.shape[-1], "weight", "crms_norm")
    check_param(bias, x.shape[-1], "bias", "crms_norm")
    sd = accumulation_dtype(x.dtype, stats_dtype)
    impl = route(backend, x, "crms_norm", stats_dtype)
    if impl != "fast":
        fn = B.executor(impl, _crms_math, ("crms_norm", weight is None, bias is None, eps, sd))
        return fn(x, weight, bias, eps, sd)
    return _CRMSNormFn.apply(x.view(-1, x.shape[-1]), weight, bias, eps, sd).view(x.shape)


def compress_zero_mean(x: Tensor) -> Tensor:
    """Lossless compression of zero-mean d-vectors (last dim) to their first d−1 entries.

    The caller guarantees ``x.mean(-1) == 0`` (e.g. ``x − x.mean(-1, keepdim=True)``); the
    dropped entry is recovered by :func:`decompress` as ``−Σ x[..., :-1]``.
    """
    check_float(x)
    if x.dim() < 1 or x.shape[-1] < 2:
        raise ValueError(f"compress_zero_mean expects input (*, d) with d >= 2, got {tuple(x.shape)}")
    return x[..., :-1]


def decompress(z: Tensor) -> Tensor:
    """Inverse of :func:`compress_zero_mean`: ``(*, d−1) → (*, d)`` by appending ``−Σ z`` (a zero-mean vector)."""
    check_float(z)
    if z.dim() < 1:
        raise ValueError(f"decompress expects input (*, d-1), got a scalar of shape {tuple(z.shape)}")
    return torch.cat([z, -z.sum(-1, keepdim=True)], dim=-1)


def fold_ln_affine(
    ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fold a LayerNorm's affine into the linear layer that reads its output (paper Sec. 3).

    ``W · (γ ⊙ n + β) + b = (W · diag(γ)) · n + (b + W · β)``; returns ``(W', b')`` so the LN can
    be replaced by an affine-free LN. ``weight`` is ``(out, d)`` as in ``nn.Linear``.
    """
    w = weight if ln_weight is None else weight * ln_weight
    b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    if ln_bias is not None:
        b = b + weight @ ln_bias
    return w, b


def center_writer(weight: Tensor, bias: Tensor | None = None, *, dim: int = 0) -> tuple[Tensor, Tensor | None]:
    """Pre-LN → Pre-RMSNorm for a residual-stream writer: make its output zero-mean over the hidden dim.

    ``nn.Linear`` writers (embedding projection, attention/MLP output projection; weight
    ``(d, k)``): hidden dim is ``dim=0`` and ``W ← W − mean_0(W)``, ``b ← b − mean(b)``.
    Tensors added to the stream directly (position embeddings ``(1, T, d)``, cls token,
    ``nn.Embedding`` weight ``(V, d)``): pass ``dim=-1``.
    """
    w = weight - weight.mean(dim, keepdim=True)
    return w, None if bias is None else bias - bias.mean()


def compress_writer(weight: Tensor, bias: Tensor | None = None, *, dim: int = 0) -> tuple[Tensor, Tensor | None]:
    """Pre-RMSNorm → Pre-CRMSNorm for a (zero-mean) writer: drop the last hidden unit (``W[:-1]``, ``b[:-1]``)."""
    w = weight.narrow(dim, 0, weight.shape[dim] - 1)
    return w, None if bias is None else bias[:-1]


def compress_reader(weight: Tensor) -> Tensor:
    """Pre-RMSNorm → Pre-CRMSNorm for a linear reading the stream: ``W' = W[:, :-1] − W[:, -1:]`` (bias unchanged).

    Exact because the input's dropped coordinate is ``−Σ`` of the kept ones.
    """
    return weight[..., :-1] - weight[..., -1:]
