"""LARS: SGD with momentum and a layer-wise local learning rate (You, Gitman, Ginsburg 2017).

Paper: "Large Batch Training of Convolutional Networks", You, Gitman, Ginsburg, 2017,
arXiv 1708.03888 (Algorithm 1). Per parameter tensor ("layer") ``w``:

    λ_local = η · ‖w‖ / (‖g‖ + β ‖w‖ + eps)          (1 when ‖w‖ or ‖g‖ is 0)
    v ← m · v + lr · λ_local · (g + β w)
    w ← w − v

with η the trust coefficient, β the weight decay and m the momentum. As in the paper, the learning
rate enters the momentum buffer (a schedule changes only new contributions; torch's SGD instead
multiplies the whole buffer by the current lr). ``eps`` (default 0, the paper has none) guards the
denominator of layers whose gradient and weight decay are both tiny.

Why it belongs with normalization: with BatchNorm the per-layer ratio ‖w‖/‖g‖ varies by orders of
magnitude between layers; scaling each layer's step to η‖w‖ is the fix the paper proposes.

Defaults: momentum=0.9, weight_decay=0, trust_coefficient=1e-3 (the paper's η), eps=0; lr required.
Group option ``trust_ratio=False`` gives the plain momentum step (biases and norm gains, see
:func:`~normkit.optim.bias_and_norm_groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from normkit.optim._checks import check_hyperparameters, closure_loss, params_with_grad


class LARS(torch.optim.Optimizer):
    """LARS; state per parameter: ``momentum_buffer``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 0.0,
        *,
        trust_ratio: bool = True,
    ) -> None:
        check_hyperparameters(
            lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps
        )
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            trust_ratio=bool(trust_ratio),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = params_with_grad(group, "LARS")
            wd = group["weight_decay"]
            for p in params:
                g = p.grad
                update = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if group["trust_ratio"]:
                    w_norm, g_norm = p.norm(), g.norm()
                    local = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    local = torch.where((w_norm > 0) & (g_norm > 0), local, torch.ones_like(local))
                    update.mul_(local)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buf)
        return loss
