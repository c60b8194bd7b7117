"""Small models for the bench: a CNN for image norms, a ViT for token norms.

Both take the norm by *name* and build every normalization layer through
:func:`normkit.create_norm`, so any registered method (including ones added later) can be
dropped in. Sizes are chosen so a full quick suite trains in about two minutes on two CPU
cores while still separating good and bad normalization choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.registry import sample_norm

#: Per-norm keyword arguments the bench passes to ``create_norm(name, C, **kwargs)``, as a
#: function of the channel count, on top of the registry's ``sample_kwargs`` (which make
#: e.g. GroupNorm's group count divide the bench's 16 channels). Defaults of some methods do
#: not suit a comparison (InstanceNorm is not affine by default, which would handicap it
#: against the others). Register an entry here when a new method needs one.
#: Methods with long warm-ups or schedules (counted in steps for ImageNet/WMT-scale runs) get
#: them shortened to the bench's few hundred steps, or they would never leave the warm-up.
NORM_KWARGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "instancenorm": lambda channels: {"affine": True},
    "ghostbn": lambda channels: {"virtual_batch_size": 16},
    "batchrenorm": lambda channels: {"warmup_steps": 50, "r_max_end_step": 400, "d_max_end_step": 250},
    # num_groups=4 = the ViT's heads, as the official code wires GroupScaling (its group_num)
    "powernorm": lambda channels: {"warmup_iters": 100, "num_groups": 4 if channels % 4 == 0 else 1},
    "unifiednorm": lambda channels: {"warmup_iters": 100, "compensation_iters": 100},
    "prepbn": lambda channels: {"total_step": 500},  # LN → RepBN over the first 500 of ~660 steps
}


def make_norm(name: str | Callable[[int], nn.Module], num_features: int) -> nn.Module:
    """``sample_norm(name, num_features)`` with the bench's per-method keyword arguments.

    ``name`` may also be a factory ``C -> module`` (e.g. ``partial(BatchNorm, channels_last=True)``).
    """
    if callable(name):
        return name(num_features)
    extra = NORM_KWARGS.get(name.lower())
    return sample_norm(name, num_features, **(extra(num_features) if extra else {}))


NormSpec = str | Callable[[int], nn.Module]


class SmallCNN(nn.Module):
    """conv3×3(16) → norm → ReLU → conv3×3/2(32) → norm → ReLU → conv3×3(32) → norm → ReLU → GAP → linear.

    Convolutions have no bias: every norm under test either has its own shift or is meant
    to be compared without one. ``conv`` swaps the convolution class (e.g. weight-standardized
    convolutions for GN+WS); ``act`` the activation (``nn.Identity`` for norm-activation layers
    such as EvoNorm and FRN+TLU, which contain their own nonlinearity).
    """

    def __init__(
        self,
        norm: NormSpec,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        conv: Callable[..., nn.Module] = nn.Conv2d,
        act: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True),
    ) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            conv(in_channels, w1, 3, padding=1, bias=False),
            make_norm(norm, w1),
            act(),
            conv(w1, w2, 3, stride=2, padding=1, bias=False),
            make_norm(norm, w2),
            act(),
            conv(w2, w2, 3, padding=1, bias=False),
            make_norm(norm, w2),
            act(),
        )
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention (no masking: every token sees every patch; ``causal=True``: each sees its past)."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # head size from the projections, not from x: a Pre-CRMSNorm model's stream is d - 1 wide
        n, t = x.shape[:2]
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(n, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, norm: NormSpec, mlp_ratio: float = 2.0, causal: bool = False) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = make_norm(norm, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT for 8×8 digits: 2×2 patches → 16 tokens, learned positions, pre-norm blocks, final norm, mean pool.

    Mean pooling instead of a cls token keeps every token on the path to the loss, which
    makes small-data training less sensitive to initialization. ``placement`` re-places the norms
    (:data:`PLACEMENTS`: ``"pre"``, ``"peri"``, ``"mix"`` with ``alpha``), see :mod:`normkit.convert.placement`.
    """

    def __init__(
        self,
        norm: NormSpec,
        in_channels: int = 1,
        image_size: int = 8,
        patch: int = 2,
        dim: int = 48,
        depth: int = 2,
        heads: int = 4,
        num_classes: int = 10,
        placement: str = "pre",
        alpha: float = 0.25,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be divisible by patch {patch}")
        tokens = (image_size // patch) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, norm) for _ in range(depth)))
        self.norm = make_norm(norm, dim)
        self.head = nn.Linear(dim, num_classes)
        _placed(self, placement, alpha)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (N, tokens, dim)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


#: norm placements of :class:`TinyViT` / :class:`TinyGPT` (``normkit.convert.placement``): Pre-LN,
#: Peri-LN (input and output norm on every sublayer) and Mix-LN (Post-LN in the first ⌊αL⌋ blocks)
PLACEMENTS = ("pre", "peri", "mix")


def _placed(model: nn.Module, placement: str, alpha: float) -> None:
    """Re-place the norms of a freshly built pre-norm model through the converters (one mechanism for all models)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    from normkit.convert.placement import to_mix_ln, to_peri_ln  # bench → convert points down

    if placement == "peri":
        to_peri_ln(model)
    elif placement == "mix":
        to_mix_ln(model, alpha)


class TinyGPT(nn.Module):
    """Decoder-only language model: token + learned position embeddings, causal pre-norm blocks, final norm, LM head.

    The GPT counterpart of :class:`TinyViT` (same :class:`Block`, ``causal=True``), small enough to train on
    CPU. ``placement`` re-places its norms (:data:`PLACEMENTS`; ``alpha`` is Mix-LN's fraction of Post-LN blocks).
    """

    def __init__(
        self,
        norm: NormSpec,
        vocab_size: int = 64,
        context: int = 32,
        dim: int = 48,
        depth: int = 2,
        heads: int = 4,
        placement: str = "pre",
        alpha: float = 0.25,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, norm, causal=True) for _ in range(depth)))
        self.norm = make_norm(norm, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        _placed(self, placement, alpha)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[-1] > self.pos.shape[1]:
            raise ValueError(f"TinyGPT: sequence length {ids.shape[-1]} exceeds the context {self.pos.shape[1]}")
        x = self.tok(ids) + self.pos[:, : ids.shape[-1]]
        return self.head(self.norm(self.blocks(x)))
