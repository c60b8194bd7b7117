"""LAMB: Adam with a layer-wise trust ratio (You et al., ICLR 2020).

Paper: You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020, arXiv 1904.00962
(Algorithm 2). Per parameter tensor ("layer") ``w`` at step t:

    m ← β1 m + (1 − β1) g ;           v ← β2 v + (1 − β2) g²
    m̂ = m / (1 − β1^t) ;              v̂ = v / (1 − β2^t)          (``bias_correction=True``)
    r = m̂ / (sqrt(v̂) + eps) ;         u = r + λ w                 (λ = weight_decay)
    w ← w − lr · φ(‖w‖) / ‖u‖ · u

with φ the identity (the paper's experiments) and the ratio taken as 1 when ‖w‖ or ‖u‖ is 0 (as
TensorFlow Addons' LAMB, the reference implementation the paper's authors contributed to).

Why it belongs with normalization: the trust ratio ‖w‖/‖u‖ makes each layer's step a fixed
fraction of its own norm, which is the quantity a following normalization layer makes irrelevant
to the function and relevant to the effective learning rate.

Defaults (TensorFlow Addons ``LAMB``): lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.
Group options: ``trust_ratio`` (False: the layer takes the plain AdamW-like step ``lr · u``; use
:func:`~normkit.optim.bias_and_norm_groups` to exclude biases and norm gains), ``bias_correction``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from normkit.optim._checks import adam_moments_, check_hyperparameters, closure_loss, params_with_grad


class LAMB(torch.optim.Optimizer):
    """LAMB; state per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        trust_ratio: bool = True,
        bias_correction: bool = True,
        foreach: bool | None = None,
    ) -> None:
        check_hyperparameters(lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_ratio=bool(trust_ratio),
            bias_correction=bool(bias_correction), foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = params_with_grad(group, "LAMB")
            if not params:
                continue
            beta1, beta2 = group["betas"]
            _, ms, vs = adam_moments_(self.state, params, group)
            for p, m, v in zip(params, ms, vs):
                t = self.state[p]["step"]
                bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if group["bias_correction"] else (1.0, 1.0)
                update = (m / bc1).div_(v.div(bc2).sqrt_().add_(group["eps"]))
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                if group["trust_ratio"]:
                    w_norm, u_norm = p.norm(), update.norm()
                    update.mul_(torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)))
                p.add_(update, alpha=-group["lr"])
        return loss
