"""Group-wise Deep Whitening-and-Coloring Transformation (GDWCT) module."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from normkit.functional._core import trailing_numel
from normkit.functional.gdwct import coloring_regularizer, gdwct, whitening_regularizer
from normkit.nn._base import describe, largest_group_count, options_repr, set_options, sync_reducer
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

GDWCT_PAPER = Paper(
    "Image-to-Image Translation via Group-wise Deep Whitening-and-Coloring Transformation",
    2019,
    "1812.09912",
    "Cho, Choi, Park, Shin, Choo",
)


class _LinearBlock(nn.Module):
    """Official ``LinearBlock(norm='none')``: ``fc`` then LeakyReLU(0.01) (or no activation)."""

    def __init__(self, d_in: int, d_out: int, act: bool, kw: dict) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, **kw)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return TF.leaky_relu(y, 0.01) if self.act else y


class _MLP(nn.Module):
    """Official ``MLP``: in→dim, ``num_block`` × dim→dim (LeakyReLU), dim→out (linear); keys ``main.i.fc.*``."""

    def __init__(self, d_in: int, d_out: int, dim: int, num_block: int, kw: dict) -> None:
        super().__init__()
        layers = [_LinearBlock(d_in, dim, True, kw)]
        layers += [_LinearBlock(dim, dim, True, kw) for _ in range(num_block)]
        layers.append(_LinearBlock(dim, d_out, False, kw))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x.reshape(x.shape[0], trailing_numel(x, 1)))


def _sample_kwargs(c: int) -> dict[str, int]:
    # groups of at least 2 channels so the coloring matrices are real matrices; a small MLP
    return {"num_groups": largest_group_count(c, max(1, c // 2)), "mlp_dim": 16}


@register_norm(
    "gdwct",
    family="conditional",
    paper=GDWCT_PAPER,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=False,
    description="group-wise centring/whitening of content, coloring with block-diagonal matrices from a style code",
    drop_in=False,
    extra_inputs=("style",),
    sample_kwargs=_sample_kwargs,
    sample_inputs=lambda x: {"style": torch.randn(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)},
)
class GDWCT(nn.Module):
    """GDWCT block, ``forward(x, style)`` with ``style`` a style code ``(N, style_dim)`` (or ``(N, style_dim, 1, 1)``).

    Cho et al., CVPR 2019, arXiv:1812.09912; follows the official ``WCT`` module of
    ``WonwoongCho/GDWCT`` (parameter names ``alpha``, ``mlp_CT.main.i.fc.*``, ``mlp_mu.main.i.fc.*``):

        S_i  = mlp_CT(style_i)                    style code split into G chunks, one shared MLP → n×n
        X_i  = S_i U_iᵀ,  U_i = S_i / ‖S_i‖_col   coloring matrix (block-diagonal over the groups)
        x̄    = x − μ_{B,H,W}(x)                   "deep whitening" = centring (official), see below
        y    = alpha · (X x̄ + mlp_mu(style)) + (1 − alpha) · x

    ``alpha`` is a learnable scalar initialised to 0.6 (``1 − w_alpha`` with w_alpha = 0.4); the official
    training loop clamps it to [0, 1] before every generator update — call :meth:`clamp_alpha_` likewise.
    MLPs: ``mlp_CT`` = ``style_dim/G → mlp_dim → 3 × (mlp_dim → mlp_dim) → n²``, ``mlp_mu`` =
    ``style_dim → style_dim → style_dim → C``, LeakyReLU(0.01), initialised as the official run
    (``INIT: kaiming``): Kaiming-normal (fan_in) weights, zero biases.

    The whitening of the official code is only the group-wise centring with **batch** statistics
    (over N·H·W, in eval too); the network learns to whiten through :meth:`whitening_loss`
    (``mean|Σ − I|``, λ_w = 1e-3) and the coloring through :meth:`coloring_loss` (``mean|U − I|``,
    λ_c = 10). ``forward(..., return_losses=True)`` returns ``(y, whitening_loss, coloring_loss)``.

    Args:
        num_features: content channels C.
        num_groups: G (official config 8); must divide C (and ``style_dim``).
        style_dim: style-code size (default C; the official code requires C).
        mlp_dim: hidden width of ``mlp_CT`` (official 256).
        eps: ridge of the covariance (official 1e-5).
        exact_whitening: apply ZCA whitening ``Σ^{-1/2}`` (eigendecomposition, eps ridge) instead of
            only centring — not the paper's method; see :func:`normkit.functional.gdwct.group_whitening`.
        per_sample: per-sample instead of batch statistics (not official).
        paper_exact_coloring_loss: :meth:`coloring_loss` uses the paper's ``mean|UᵀU − I|``.
        process_group: in training, the batch mean (and, with ``return_losses``, the covariance) over
            every process (:mod:`normkit.sync`; one packed collective per call). The statistics are
            batch-dependent (over N·H·W, as the official code), so without it each process centres
            with its own slice of the batch. Ignored with ``per_sample``.

    Speed: the layer runs as one affine map per group (one mean pass and one batched product, see
    :func:`normkit.functional.gdwct.gdwct`); the covariance (a centred copy and a Gram product) is
    only computed with ``return_losses=True``.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 8,
        style_dim: int | None = None,
        mlp_dim: int = 256,
        eps: float = 1e-5,
        *,
        alpha_init: float = 0.6,
        exact_whitening: bool = False,
        per_sample: bool = False,
        paper_exact_coloring_loss: bool = False,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, process_group=process_group)
        c = int(num_features)
        sd = c if style_dim is None else int(style_dim)
        if (
            isinstance(num_groups, bool)
            or not isinstance(num_groups, int)
            or num_groups <= 0
            or c % num_groups
            or sd % num_groups
        ):
            raise ValueError(
                f"GDWCT: num_groups={num_groups!r} must be a positive divisor of num_features={c} and style_dim={sd}"
            )
        self.num_features = c
        self.num_groups = num_groups
        self.style_dim = sd
        self.mlp_dim = int(mlp_dim)
        self.eps = float(eps)
        self.alpha_init = float(alpha_init)
        self.exact_whitening = bool(exact_whitening)
        self.per_sample = bool(per_sample)
        self.paper_exact_coloring_loss = bool(paper_exact_coloring_loss)
        n = c // num_groups
        kw = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(1, **kw))
        self.mlp_CT = _MLP(sd // num_groups, n * n, self.mlp_dim, 3, kw)
        self.mlp_mu = _MLP(sd, c, sd, 1, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.kaiming_normal_(mod.weight, a=0, mode="fan_in")
                nn.init.zeros_(mod.bias)

    @torch.no_grad()
    def clamp_alpha_(self) -> None:
        """Clamp ``alpha`` to [0, 1] in place (the official training loop does this before each G step)."""
        self.alpha.clamp_(0.0, 1.0)

    def style_parameters(self, style: Tensor) -> tuple[Tensor, Tensor]:
        """``(S, μ_style)``: the coloring matrices ``(N, G, n, n)`` (before normalization) and the style mean ``(N, C)``."""
        b, g, n = style.shape[0], self.num_groups, self.num_features // self.num_groups
        s = self.mlp_CT(style.reshape(b * g, self.style_dim // g)).reshape(b, g, n, n)
        return s, self.mlp_mu(style.reshape(b, self.style_dim))

    def forward(
        self, x: Tensor, style: Tensor | None = None, *, return_losses: bool = False
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        if style is None:
            raise ValueError(f"GDWCT.forward(x, style) needs the style code (N, {self.style_dim})")
        c = self.num_features
        if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[1] != c:
            shape = describe(x)
            raise ValueError(f"GDWCT expects content of shape (N, {c}, *spatial), got {shape}")
        n, sd = x.shape[0], self.style_dim
        if not isinstance(style, Tensor) or tuple(style.shape) not in ((n, sd), (n, sd, 1, 1)):
            shape = describe(style)
            raise ValueError(f"GDWCT expects a style code of shape (N={n}, {sd}) or (N, {sd}, 1, 1), got {shape}")
        s, mu = self.style_parameters(style)
        y, cov, u = gdwct(
            x, s, mu, self.alpha, self.num_groups, self.eps, exact=self.exact_whitening, per_sample=self.per_sample,
            with_cov=return_losses, reducer=None if self.per_sample else sync_reducer(self),
        )
        if not return_losses:
            return y
        return y, self.whitening_loss(cov), self.coloring_loss(u)

    @staticmethod
    def whitening_loss(cov: Tensor) -> Tensor:
        """``mean|Σ − I|`` (see :func:`normkit.functional.gdwct.whitening_regularizer`)."""
        return whitening_regularizer(cov)

    def coloring_loss(self, u: Tensor) -> Tensor:
        """``mean|U − I|`` (official) or ``mean|UᵀU − I|`` with ``paper_exact_coloring_loss``."""
        return coloring_regularizer(u, paper_exact=self.paper_exact_coloring_loss)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, num_groups={self.num_groups}, style_dim={self.style_dim}, mlp_dim={self.mlp_dim}"
        s += f", eps={self.eps}"
        for name in ("exact_whitening", "per_sample", "paper_exact_coloring_loss"):
            if getattr(self, name):
                s += f", {name}=True"
        return s + options_repr(self)
