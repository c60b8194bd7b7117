"""Small models for the bench: a CNN for image norms, a ViT for token norms.

Both take the norm by *name* and build every normalization layer through
:func:`normkit.create_norm`, so any registered method (including ones added later) can be
dropped in. Sizes are chosen so a full quick suite trains in about two minutes on two CPU
cores while still separating good and bad normalization choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.registry import sample_norm


@dataclass(frozen=True)
class RunLength:
    """Length of the training run a model is built for: its optimizer ``steps`` and learning-rate
    warm-up steps. Norms with schedules (PowerNorm's and UN's warm-up, PRepBN's LN → RepBN
    transition, Batch Renorm's clipping ramps) get them as fractions of it, so a schedule never
    outlasts a short run (a PRepBN evaluated mid-transition) and never ends in its first steps."""

    steps: int
    warmup: int


#: Run length assumed when a model is built outside a bench run (tests, direct use): the digits
#: ViT's ~660 steps with 10% warm-up.
DEFAULT_RUN = RunLength(660, 66)
_RUN: ContextVar[RunLength] = ContextVar("normkit_bench_run_length", default=DEFAULT_RUN)


@contextmanager
def run_length(steps: int, warmup: int) -> Iterator[RunLength]:
    """Build models inside this block for a run of ``steps`` optimizer steps with ``warmup`` warm-up steps."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"run length needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    run = RunLength(int(steps), int(warmup))
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


def current_run() -> RunLength:
    """The :class:`RunLength` models are being built for (:data:`DEFAULT_RUN` outside :func:`run_length`)."""
    return _RUN.get()


#: PRepBN's LN → RepBN transition as a fraction of the run: the official SLAB configs (slab_deit,
#: slab_swin) decay λ over 60 000 training forward calls of a 300-epoch ImageNet run at global batch
#: 1024 (~375 000 steps), about 16%; training then continues on RepBN alone, as eval uses it.
PREPBN_FRACTION = 60_000 / 375_000
#: UN's warm-up (batch statistics, no smoothing) as a fraction of the run: the official IWSLT14 recipe
#: runs ``--un-warmup 4000`` of ``--max-update 100000``; its gradient compensation starts with it.
UN_WARMUP_FRACTION = 4_000 / 100_000

#: Per-norm keyword arguments the bench passes to ``create_norm(name, C, **kwargs)``, as a function
#: of the channel count and the :class:`RunLength`, on top of the registry's ``sample_kwargs``
#: (which make e.g. GroupNorm's group count divide the bench's 16 channels). Defaults of some
#: methods do not suit a comparison (InstanceNorm is not affine by default, which would handicap it
#: against the others). Register an entry here when a new method needs one.
#: Schedules counted in steps for ImageNet/WMT-scale runs are expressed as fractions of the run
#: (never absolute step counts), with the official recipe's ratio where it has one:
#: PowerNorm's warm-up is the learning-rate warm-up (the official ``NormSelect`` passes
#: ``--warmup-updates``), UN's 4% of the run (above), PRepBN's transition 16% (above); Batch Renorm's
#: ramps keep the fractions the bench used for a 660-step run (BN warm-up 50, r_max 400, d_max 250 steps).
NORM_KWARGS: dict[str, Callable[[int, RunLength], dict[str, Any]]] = {
    "instancenorm": lambda channels, run: {"affine": True},
    "ghostbn": lambda channels, run: {"virtual_batch_size": 16},
    "batchrenorm": lambda channels, run: {
        "warmup_steps": max(1, round(50 / 660 * run.steps)),
        "r_max_end_step": max(1, round(400 / 660 * run.steps)),
        "d_max_end_step": max(1, round(250 / 660 * run.steps)),
    },
    # num_groups=4 = the ViT's heads, as the official code wires GroupScaling (its group_num)
    "powernorm": lambda channels, run: {"warmup_iters": max(1, run.warmup), "num_groups": 4 if channels % 4 == 0 else 1},
    "unifiednorm": lambda channels, run: {
        "warmup_iters": max(1, round(UN_WARMUP_FRACTION * run.steps)),
        "compensation_iters": max(1, round(UN_WARMUP_FRACTION * run.steps)),
    },
    "prepbn": lambda channels, run: {"total_step": max(1, round(PREPBN_FRACTION * run.steps))},
}


def make_norm(name: str | Callable[[int], nn.Module], num_features: int) -> nn.Module:
    """``sample_norm(name, num_features)`` with the bench's per-method keyword arguments for the current run.

    ``name`` may also be a factory ``C -> module`` (e.g. ``partial(BatchNorm, channels_last=True)``).
    """
    if callable(name):
        return name(num_features)
    extra = NORM_KWARGS.get(name.lower())
    return sample_norm(name, num_features, **(extra(num_features, current_run()) if extra else {}))


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
