"""The radial projection of AdamP / SGDP (Heo et al., ICLR 2021).

Paper: "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, ICLR 2021, arXiv 2006.08217. Official code: clovaai/AdamP
(``adamp/adamp.py``, ``adamp/sgdp.py``, v0.3.0); this module restates its ``_projection``.

For a weight ``w`` (ndim > 1), gradient ``g`` and update ``u`` (Adam's ``m / denom`` or SGD's
momentum buffer), with each *view* ``V`` (first the channel view ``w.view(C_out, -1)``, then the
layer view ``w.view(1, -1)``):

    cos_r = |<g_r, w_r>| / (‖g_r‖ ‖w_r‖)        per row r of the view (``F.cosine_similarity``, eps)
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
import torch.nn.functional as F

PROJECTION_MODES = ("auto", "channel", "layer", "off")


def check_projection(mode: object) -> None:
    if mode not in PROJECTION_MODES:
        raise ValueError(f"projection must be one of {PROJECTION_MODES}, got {mode!r}")


def _view(x: torch.Tensor, which: str) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if which == "channel" else x.reshape(1, -1)


def _remove_radial_(p: torch.Tensor, update: torch.Tensor, which: str, eps: float) -> None:
    expand = [-1] + [1] * (p.dim() - 1)
    p_n = p / _view(p, which).norm(dim=1).view(expand).add_(eps)
    update.sub_(p_n * _view(p_n * update, which).sum(dim=1).view(expand))


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
    if mode == "off" or p.numel() == 0:
        return 1.0
    if mode in ("channel", "layer"):
        if p.dim() == 0:
            return 1.0
        _remove_radial_(p, update, mode, eps)
        return wd_ratio
    if p.dim() <= 1:
        return 1.0
    for which in ("channel", "layer"):
        cos = F.cosine_similarity(_view(grad, which), _view(p, which), dim=1, eps=eps).abs_()
        if cos.max() < delta / math.sqrt(_view(p, which).shape[1]):
            _remove_radial_(p, update, which, eps)
            return wd_ratio
    return 1.0
