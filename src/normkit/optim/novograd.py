"""NovoGrad: momentum SGD on gradients normalized by a layer-wise second moment (Ginsburg et al. 2019).

Paper: Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang, Cohen,
"Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks",
2019, arXiv 1905.11286 (Algorithm 1); official code NVIDIA/OpenSeq2Seq
``open_seq2seq/optimizers/novograd.py`` (class ``NovoGrad2``), followed here. Per parameter tensor
("layer") ``w``:

    v ← ‖g‖²                       if v == 0 (the first step; the official test is ``v == 0``)
    v ← β2 v + (1 − β2) ‖g‖²       otherwise                     (one scalar per layer)
    d = g / sqrt(v + eps) + λ w                                  (λ = weight_decay)
    d ← (1 − β1) d                 if grad_averaging
    m ← β1 m + d ;   w ← w − lr · m

The weight decay is *decoupled* from the adaptive scaling (added after the division by sqrt(v),
like AdamW's), but, unlike AdamW, it goes through the momentum. The second moment is one number
per layer instead of one per weight, so the optimizer state is SGD's plus a scalar per tensor.

Defaults (official ``NovoGrad2``): betas=(0.95, 0.98), eps=1e-8, weight_decay=0,
grad_averaging=False; ``lr`` has no default (the official signature's 1.0 is not a tuned value).

Divergence: the official ``apply_gradients`` rebinds its Python list entry
(``self._grads_ema[i] = tf.cond(...)``) instead of assigning the variable, so in TF1 graph mode the
stored moment stays 0 and every step takes the first-step branch, ``v = ‖g‖²`` (β2 unused). This
class keeps the moving average that the docstring and the paper's Algorithm 1 describe;
``betas=(β1, 0.0)`` reproduces what the official graph computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from normkit.optim._checks import check_hyperparameters, closure_loss, params_with_grad


class NovoGrad(torch.optim.Optimizer):
    """NovoGrad; state per parameter: ``exp_avg`` (m) and ``exp_avg_sq`` (a 0-d tensor, v)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.95, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_averaging: bool = False,
    ) -> None:
        check_hyperparameters(lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, grad_averaging=bool(grad_averaging))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = params_with_grad(group, "NovoGrad")
            beta1, beta2 = group["betas"]
            for p in params:
                g = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros((), dtype=torch.float32, device=p.device)
                v = state["exp_avg_sq"]
                g2 = g.float().square().sum()
                v.copy_(torch.where(v == 0, g2, v * beta2 + g2 * (1 - beta2)))
                d = g / (v + group["eps"]).sqrt().to(g.dtype)
                if group["weight_decay"] != 0:
                    d.add_(p, alpha=group["weight_decay"])
                if group["grad_averaging"]:
                    d.mul_(1 - beta1)
                m = state["exp_avg"]
                m.mul_(beta1).add_(d)
                p.add_(m, alpha=-group["lr"])
        return loss
