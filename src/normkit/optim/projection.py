"""The radial projection of AdamP / SGDP (Heo et al., ICLR 2021).

Paper: "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, ICLR 2021, arXiv 2006.08217. Official code: clovaai/AdamP
(``adamp/adamp.py``, ``adamp/sgdp.py``, v0.3.0); this module restates its ``_projection``.

For a weight ``w`` (ndim > 1), gradient ``g`` and update ``u`` (Adam's ``m / denom`` or SGD's
momentum buffer), with each *view* ``V`` (first the channel view ``w.view(C_out, -1)``, then the
layer view ``w.view(1, -1)``):

    cos_r = |<g_r, w_r>| / (max(‖g_r‖, eps) max(‖w_r‖, eps))   per row r (``F.cosine_similarity``)
    if max_r cos_r < delta / sqrt(d)           (d = row length of the view)
        ŵ_r = w_r / (‖w_r‖ + eps)
        u_r ← u_r − ŵ_r <ŵ_r, u_r>            (the radial part of the update is removed)
        weight-decay factor = wd_ratio; stop
    otherwise the factor is 1 and ``u`` is unchanged.

A gradient nearly orthogonal to the weight is the signature of scale invariance (∇L(cw) ⊥ w), so
the test detects weights that feed a normalization layer without being told; ``delta / sqrt(d)``
is the cosine a random direction would have in d dimensions. The update is edited **in place**,
as the official code does (``perturb -= ...``): for SGDP without Nesterov the update *is* the
momentum buffer, so the projection changes later steps too.

``mode`` extends the official behaviour (``"auto"``, the default, is the official test):
``"channel"`` / ``"layer"`` always project with that view (for weights known to be
scale-invariant, e.g. from :func:`normkit.optim.scale_invariant_params`), ``"off"`` never.
"""

from __future__ import annotations

import math

import torch

PROJECTION_MODES = ("auto", "channel", "layer", "off")


def check_projection(mode: object) -> None:
    if mode not in PROJECTION_MODES:
        raise ValueError(f"projection must be one of {PROJECTION_MODES}, got {mode!r}")


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    x = x.reshape(rows, -1)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_rj b_rj per row, as a batched matrix product (no temporary of a's size)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _radial_coef(p: torch.Tensor, update: torch.Tensor, rows: int, w_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Per row, ``c_r = <w_r, u_r> / (‖w_r‖ + eps)²`` shaped to broadcast against ``p``: the radial part of
    the update is ``w · c`` (the official ``ŵ <ŵ, u>`` with ŵ = w / (‖w‖ + eps), regrouped so that no
    normalized copy of w is made)."""
    coef = _row_dot(_rows(p, rows), _rows(update, rows)) / (w_norm + eps).square()
    return coef.view([-1] + [1] * (p.dim() - 1))


def radial_coefficients(
    p: torch.Tensor, grad: torch.Tensor, update: torch.Tensor, *, delta: float, eps: float, mode: str = "auto"
) -> torch.Tensor | None:
    """The coefficients ``c`` of the radial part ``w · c`` of ``update`` when the projection applies to ``p``
    (AdamP's test, or a forced ``mode``), else ``None``. :func:`project_radial_` subtracts ``w · c``;
    AdamP folds it into its parameter update instead (one pass over the update less)."""
    if mode == "off" or p.numel() == 0:
        return None
    if mode in ("channel", "layer"):
        if p.dim() == 0:
            return None
        rows = p.shape[0] if mode == "channel" else 1
        return _radial_coef(p, update, rows, torch.linalg.vector_norm(_rows(p, rows), dim=1), eps)
    if p.dim() <= 1:
        return None
    # F.cosine_similarity(g_r, w_r, eps) = <g_r, w_r> / (max(‖g_r‖, eps) · max(‖w_r‖, eps)); the
    # per-row sums also give the layer view's (one pass over g and w for both views).
    channels = p.shape[0]
    w2, g2 = _rows(p, channels), _rows(grad, channels)
    dots = _row_dot(g2, w2)
    g_norm = torch.linalg.vector_norm(g2, dim=1)
    w_norm = torch.linalg.vector_norm(w2, dim=1)
    cos = dots.abs() / (g_norm.clamp_min(eps) * w_norm.clamp_min(eps))
    if cos.max() < delta / math.sqrt(w2.shape[1]):
        return _radial_coef(p, update, channels, w_norm, eps)
    layer_w_norm = w_norm.square().sum().sqrt().view(1)
    layer_cos = dots.sum().abs() / (g_norm.square().sum().sqrt().clamp_min(eps) * layer_w_norm.clamp_min(eps))
    if layer_cos < delta / math.sqrt(p.numel()):
        return _radial_coef(p, update, 1, layer_w_norm, eps)
    return None


def project_radial_(
    p: torch.Tensor,
    grad: torch.Tensor,
    update: torch.Tensor,
    *,
    delta: float,
    wd_ratio: float,
    eps: float,
    mode: str = "auto",
) -> float:
    """Remove the radial component of ``update`` in place when ``p`` looks scale-invariant.

    Returns the weight-decay factor: ``wd_ratio`` when the projection was applied, else 1.
    ``"auto"`` applies only to ``p.dim() > 1`` (as the official code); the forced modes apply to
    any ``p`` with at least one element per view row.
    """
    coef = radial_coefficients(p, grad, update, delta=delta, eps=eps, mode=mode)
    if coef is None:
        return 1.0
    update.addcmul_(p, coef.to(update.dtype), value=-1.0)
    return wd_ratio
