"""AdamP: Adam whose update loses its radial component on scale-invariant weights.

Paper: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights", ICLR 2021, arXiv 2006.08217; official code clovaai/AdamP ``adamp/adamp.py`` (v0.3.0),
followed step for step. Per parameter, at step t (bias corrections ``bc1 = 1 − β1^t``,
``bc2 = 1 − β2^t``):

    m ← β1 m + (1 − β1) g ;  v ← β2 v + (1 − β2) g²
    denom = sqrt(v) / sqrt(bc2) + eps
    u = m / denom                       (Nesterov: u = (β1 m + (1 − β1) g) / denom)
    u, f = projection(w, g, u)          (see :mod:`normkit.optim.projection`; f = wd_ratio or 1)
    w ← w · (1 − lr · weight_decay · f) (decoupled decay, applied before the step)
    w ← w − (lr / bc1) · u

Why: on a weight followed by a normalization layer, momentum pushes the update's radial part into
the weight norm, which grows and silently shrinks the effective step (∝ lr/‖w‖²); removing the
radial part keeps the norm from growing and leaves the function's direction of change untouched.

Defaults (official): lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, delta=0.1,
wd_ratio=0.1, nesterov=False. Additions (defaults keep the official behaviour):
``projection`` per group (``"auto"`` official test, ``"channel"``/``"layer"`` always,
``"off"`` never) and ``foreach`` (multi-tensor moment updates; same arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from normkit.optim._checks import (
    adam_moments_,
    check_betas,
    check_hyperparameters,
    check_lr,
    closure_loss,
    params_with_grad,
)
from normkit.optim.projection import check_projection, radial_coefficients


class AdamP(torch.optim.Optimizer):
    """Adam with AdamP's projection; state per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        projection: str = "auto",
        foreach: bool | None = None,
    ) -> None:
        check_hyperparameters(lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio)
        check_projection(projection)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
            nesterov=bool(nesterov), projection=projection, foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, check in (("projection", check_projection), ("betas", check_betas), ("lr", check_lr)):
            if key in param_group:
                check(param_group[key])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = params_with_grad(group, "AdamP")
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads, exp_avgs, exp_avg_sqs = adam_moments_(self.state, params, group)
            for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
                step = self.state[p]["step"]
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                denom = v.sqrt().div_(math.sqrt(bias_correction2)).add_(group["eps"])
                step_size = group["lr"] / bias_correction1
                # the update is written into denom's buffer: one parameter-sized temporary per step, not two
                if group["nesterov"]:
                    perturb = torch.lerp(g, m, beta1).div_(denom)  # (β1 m + (1 − β1) g) / denom
                else:
                    perturb = torch.div(m, denom, out=denom)
                coef = radial_coefficients(p, g, perturb, delta=group["delta"], eps=group["eps"], mode=group["projection"])
                wd_factor = 1.0 if coef is None else group["wd_ratio"]
                decay = 1 - group["lr"] * group["weight_decay"] * wd_factor if group["weight_decay"] > 0 else 1.0
                if coef is not None:
                    # w·decay − step·(u − w·c) = w·(decay + step·c) − step·u: the official projection of u,
                    # its decay and its step in two passes over w (the same value to rounding)
                    p.mul_(coef.mul(step_size).add_(decay))
                elif decay != 1.0:
                    p.mul_(decay)
                p.add_(perturb, alpha=-step_size)
        return loss
