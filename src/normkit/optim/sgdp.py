"""SGDP: SGD with momentum whose update loses its radial component on scale-invariant weights.

Paper: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights", ICLR 2021, arXiv 2006.08217; official code clovaai/AdamP ``adamp/sgdp.py`` (v0.3.0),
followed step for step:

    buf ← momentum · buf + (1 − dampening) · g     (buf starts at 0; no ``buf = g`` first step)
    d = g + momentum · buf  if nesterov  else  buf
    d, f = projection(w, g, d)                     (:mod:`normkit.optim.projection`)
    w ← w · (1 − lr · weight_decay · f / (1 − momentum))
    w ← w − lr · d

Two official details that differ from ``torch.optim.SGD`` and are kept by default:

* the decoupled weight decay is divided by ``(1 − momentum)`` (10× at momentum 0.9), the decay
  a momentum buffer would accumulate in steady state (``wd_momentum_scaling=False`` drops the
  division: ``w ← w · (1 − lr · weight_decay · f)``);
* without Nesterov, ``d`` *is* the momentum buffer, so the projection edits the buffer in place
  and every later step carries it. ``project_momentum=False`` projects a copy instead (the buffer
  keeps the raw momentum; with Nesterov both settings are the same, since ``d`` is a new tensor).

Defaults (official): lr required, momentum=0, dampening=0, weight_decay=0, nesterov=False,
eps=1e-8, delta=0.1, wd_ratio=0.1. ``projection`` per group as in :class:`~normkit.optim.AdamP`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from normkit.optim._checks import check_hyperparameters, check_lr, closure_loss, params_with_grad, use_foreach
from normkit.optim.projection import check_projection, project_radial_


class SGDP(torch.optim.Optimizer):
    """SGD with momentum and SGDP's projection; state per parameter: ``momentum`` (the buffer)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        projection: str = "auto",
        project_momentum: bool = True,
        wd_momentum_scaling: bool = True,
        foreach: bool | None = None,
    ) -> None:
        check_hyperparameters(
            lr, momentum=momentum, dampening=dampening, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio
        )
        check_projection(projection)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=bool(nesterov),
            eps=eps, delta=delta, wd_ratio=wd_ratio, projection=projection,
            project_momentum=bool(project_momentum), wd_momentum_scaling=bool(wd_momentum_scaling), foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "projection" in param_group:
            check_projection(param_group["projection"])
        if "lr" in param_group:
            check_lr(param_group["lr"])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = params_with_grad(group, "SGDP")
            if not params:
                continue
            momentum, dampening = group["momentum"], group["dampening"]
            grads = [p.grad for p in params]
            for p in params:
                if len(self.state[p]) == 0:
                    self.state[p]["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum"] for p in params]
            if use_foreach(group["foreach"], params):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - dampening)
            else:
                for buf, g in zip(bufs, grads):
                    buf.mul_(momentum).add_(g, alpha=1 - dampening)
            for p, g, buf in zip(params, grads, bufs):
                if group["nesterov"]:
                    d_p = torch.add(g, buf, alpha=momentum)  # g + momentum · buf, one temporary
                else:
                    d_p = buf if group["project_momentum"] else buf.clone()
                wd_factor = project_radial_(
                    p, g, d_p, delta=group["delta"], wd_ratio=group["wd_ratio"], eps=group["eps"],
                    mode=group["projection"],
                )
                if group["weight_decay"] > 0:
                    scale = 1 - momentum if group["wd_momentum_scaling"] else 1.0
                    p.mul_(1 - group["lr"] * group["weight_decay"] * wd_factor / scale)
                p.add_(d_p, alpha=-group["lr"])
        return loss
