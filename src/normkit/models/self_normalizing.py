"""Self-normalizing networks: SELU MLPs with LeCun-normal weights and AlphaDropout.

Klambauer, Unterthiner, Mayr, Hochreiter, "Self-Normalizing Neural Networks", NeurIPS 2017,
arXiv:1706.02515. Official code: ``bioinf-jku/SNNs`` (``TF_1_x/selu.py`` and notebooks).

``selu(x) = λ·x`` for ``x > 0`` and ``λ·α·(eˣ − 1)`` otherwise, with α ≈ 1.6733 and λ ≈ 1.0507
chosen so that (mean, variance) = (0, 1) is a stable fixed point of the map a layer induces on
its activations' moments, given weights with Σw = 0 and Σw² = 1 per unit — in expectation what
LeCun-normal weights ``N(0, 1/fan_in)`` give. torch's ``nn.SELU`` and ``nn.AlphaDropout`` compute
the official ``selu`` and ``dropout_selu`` (α' = −λα, affine correction to keep (0, 1)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from normkit.nn.init import lecun_normal_
from normkit.registry import Paper

SNN_PAPER = Paper("Self-Normalizing Neural Networks", 2017, "1706.02515", "Klambauer, Unterthiner, Mayr, Hochreiter")

#: SELU constants of the official code (``selu.py``).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def self_normalizing_mlp(
    in_features: int,
    out_features: int,
    depth: int,
    width: int,
    dropout: float = 0.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """A self-normalizing MLP: ``depth`` × (Linear → SELU [→ AlphaDropout]) → Linear.

    Klambauer et al. 2017, arXiv:1706.02515. Every Linear (the output layer too) gets LeCun-normal
    weights ``N(0, 1/fan_in)`` (:func:`normkit.nn.init.lecun_normal_`) and zero biases, as the
    official code. ``dropout`` > 0 adds ``nn.AlphaDropout(dropout)`` after each SELU (the paper's
    recommendation: rates 0.05–0.1); inputs should be standardized to mean 0, variance 1.
    """
    for name, v in (("in_features", in_features), ("out_features", out_features), ("depth", depth), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "depth" else 1):
            raise ValueError(
                f"self_normalizing_mlp: {name} must be a {'non-negative' if name == 'depth' else 'positive'} int, got {v!r}"
            )
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"self_normalizing_mlp: dropout must be in [0, 1), got {dropout!r}")
    kw = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width, **kw), nn.SELU()]
        if dropout > 0:
            layers.append(nn.AlphaDropout(dropout))
    layers.append(nn.Linear(width if depth else in_features, out_features, **kw))
    for m in layers:
        if isinstance(m, nn.Linear):
            lecun_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class LayerMoments(NamedTuple):
    """Mean and variance (over the batch and all units) of one hidden layer's output."""

    layer: int
    mean: float
    var: float


@torch.no_grad()
def activation_moments(model: nn.Module, x: Tensor, *, after: tuple[type[nn.Module], ...] = (nn.SELU,)) -> list[LayerMoments]:
    """Per-layer mean/variance of the outputs of ``model``'s ``after`` modules (in call order) on ``x``.

    With ``model`` from :func:`self_normalizing_mlp` and the default, one entry per hidden layer
    (the SELU outputs; AlphaDropout is an identity in eval). Runs ``model`` in its current mode.
    """
    out: list[LayerMoments] = []

    def hook(_m: nn.Module, _i: object, y: Tensor) -> None:
        yf = y.detach().double()
        out.append(LayerMoments(len(out), float(yf.mean()), float(yf.var(correction=0))))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, after)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def selu_fixed_point(
    depth: int = 32,
    width: int = 256,
    num_samples: int = 1024,
    *,
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[LayerMoments]:
    """Check the SNN fixed point: moments of each layer of a fresh SELU net fed standard-normal input.

    Builds ``self_normalizing_mlp(width, width, depth, width, dropout)`` with a seeded generator,
    propagates ``num_samples`` draws of ``N(0, I)`` through it and returns, per hidden layer, the
    mean and variance of its output (after AlphaDropout when ``dropout`` > 0, run in training
    mode so the dropout is active). At initialisation they should stay near (0, 1) at any depth
    (Klambauer et al. 2017, Theorem 1); a ReLU or tanh net drifts instead.
    """
    devnull = torch.random.fork_rng()
    with devnull:
        torch.manual_seed(seed)
        model = self_normalizing_mlp(width, width, depth, width, dropout, dtype=dtype)
        x = torch.randn(num_samples, width, dtype=dtype)
        model.train(dropout > 0)
        after: tuple[type[nn.Module], ...] = (nn.AlphaDropout,) if dropout > 0 else (nn.SELU,)
        return activation_moments(model, x, after=after)
