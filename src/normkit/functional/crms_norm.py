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

import torch
from torch import Tensor

from normkit import backend as B
from normkit.functional._core import check_eps, check_float, check_param
from normkit.stats import accumulation_dtype


def _crms_math(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, sd: torch.dtype) -> Tensor:
    xf = x.to(sd)
    d = x.shape[-1] + 1
    s = xf.sum(-1, keepdim=True)
    q = xf.square().sum(-1, keepdim=True)
    y = xf * torch.rsqrt((q + s.square()) / d + eps)
    if weight is not None:
        y = y * weight.to(sd)
    if bias is not None:
        y = y + bias.to(sd)
    return y.to(x.dtype)


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
    """
    check_float(x)
    eps = check_eps(eps)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"crms_norm expects input (*, d-1) with d-1 >= 1 compressed features, got {tuple(x.shape)}")
    check_param(weight, x.shape[-1], "weight", "crms_norm")
    check_param(bias, x.shape[-1], "bias", "crms_norm")
    sd = accumulation_dtype(x.dtype, stats_dtype)
    fn = B.executor(B.resolve(backend, x, "crms_norm"), _crms_math, ("crms_norm", weight is None, bias is None, eps, sd))
    return fn(x, weight, bias, eps, sd)


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
