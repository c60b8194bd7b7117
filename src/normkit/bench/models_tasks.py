"""Sequence models for the bench: a 1-D CNN and a small transformer for MNIST-1D, a byte-level causal LM.

Like :mod:`normkit.bench.models`, every normalization layer is built by name through
:func:`normkit.bench.models.make_norm`, so any registered norm (or a factory ``C -> module``) drops in.

Padding: the LM trains on variable-length, right-padded batches (:func:`normkit.data.text.padded_batches`).
Norms that compute statistics over the batch see only the real tokens (gathered to ``(N, C)``, see
:func:`apply_norm`): padded positions never enter their batch statistics nor, for PowerNorm and UN,
the statistics and gradients of their approximate backwards. Per-token norms (LN, RMSNorm, DyT, …)
see the whole padded batch. ``mask_padding=False`` switches this off (padded tokens counted in
batch statistics: the naive transformer BN the PowerNorm paper criticises).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.bench.models import NormSpec, make_norm


def _batch_statistics(norm: nn.Module) -> bool:
    """Whether a norm computes statistics over the batch (a ``running_*`` buffer in it or its children)."""
    return any(name.rsplit(".", 1)[-1].startswith("running_") for name, _ in norm.named_buffers())


def apply_norm(norm: nn.Module, x: Tensor, valid: Tensor | None, gather: bool) -> Tensor:
    """``norm(x)``; with ``gather`` (a statistics norm) only the real tokens of ``valid`` are normalized.

    ``valid`` is ``(B, T)`` bool, True = real token. The real tokens are gathered into ``(N, C)``,
    normalized without a mask, and scattered back (padded positions get 0; they never reach a real
    token's prediction, as attention is causal and padding is on the right). For BN/RepBN/PRepBN this
    equals passing the mask. For PowerNorm and UN it does not: their approximate backwards (official
    code) average the gradient statistic (``ema_gz``/``gz``) over *all* positions and send
    ``−ν·z/ψ`` into padded ones as well, where the true gradient is 0. With the bench's ~45% padding
    that spurious gradient flowed back through attention into the weights: PowerNorm diverged (also
    at lr 1e-3 and 5e-4) and UN stayed above the unigram level (issue 17, 2026-12-03); on the real
    tokens alone both train like LN. The papers' fairseq batches are length-bucketed, with little
    padding. ``gather``: :func:`_batch_statistics` of the norm, unless ``mask_padding=False``.
    """
    if valid is None or not gather:
        return norm(x)
    out = x.new_zeros(x.shape)
    out[valid] = norm(x[valid])
    return out


class CausalBlock(nn.Module):
    """Pre-norm transformer block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; causal or not."""

    def __init__(self, dim: int, heads: int, norm: NormSpec, *, causal: bool, mlp_ratio: float = 4.0, mask_padding: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.norm1 = make_norm(norm, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = make_norm(norm, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self._gather = (_batch_statistics(self.norm1), _batch_statistics(self.norm2)) if mask_padding else (False, False)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        n, t, d = x.shape
        h = apply_norm(self.norm1, x, valid, self._gather[0])
        q, k, v = self.qkv(h).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(apply_norm(self.norm2, x, valid, self._gather[1]))


class ByteLM(nn.Module):
    """Byte-level causal transformer LM: embedding (256) + learned positions, pre-norm blocks, final norm, tied head.

    ``forward(ids, valid=None) -> logits (B, T, 256)``. Right padding never leaks into real tokens'
    predictions (causal attention); ``valid`` keeps it out of batch statistics.

    The embedding (std 1/√dim, so that the tied head's logits start at unit scale) is multiplied by
    ``embed_scale`` (default √dim) on the way in, as in Vaswani et al. 2017 (arXiv:1706.03762, §3.4):
    the residual stream then starts at unit scale for every norm. Statistics norms do not care, but a
    norm without statistics does: with the raw 0.125-std embeddings DyT (α₀ = 0.5) saw inputs 8× too
    small and stayed at the unigram level (train loss 3.3 nats at lr 1e-3 and 3e-3, with or without
    clipping, 2026-12-03); the DyT paper adds the same √d factor, as a learnable scalar, for LLaMA.
    ``embed_scale=1`` restores the earlier model.
    """

    def __init__(
        self,
        norm: NormSpec,
        *,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        max_len: int = 128,
        vocab: int = 256,
        mask_padding: bool = True,
        embed_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.embed_scale = math.sqrt(dim) if embed_scale is None else float(embed_scale)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, norm, causal=True, mask_padding=mask_padding) for _ in range(depth))
        self.norm = make_norm(norm, dim)
        self._gather = _batch_statistics(self.norm) and mask_padding
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(dim))

    def forward(self, ids: Tensor, valid: Tensor | None = None) -> Tensor:
        if ids.shape[1] > self.pos.shape[1]:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len {self.pos.shape[1]}")
        x = self.embed(ids) * self.embed_scale + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, valid)
        x = apply_norm(self.norm, x, valid, self._gather)
        return x @ self.embed.weight.t()  # tied output layer


class SeqTransformer(nn.Module):
    """Transformer classifier over MNIST-1D's 40 positions: each position a token (value → dim), mean pool."""

    def __init__(self, norm: NormSpec, *, length: int = 40, dim: int = 48, depth: int = 2, heads: int = 4, num_classes: int = 10):
        super().__init__()
        self.inp = nn.Conv1d(1, dim, 3, padding=1)  # a local patch of 3 values per token
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, norm, causal=False, mlp_ratio=2.0) for _ in range(depth))
        self.norm = make_norm(norm, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x).transpose(1, 2) + self.pos  # (N, 40, dim)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class SeqCNN(nn.Module):
    """1-D CNN for MNIST-1D: conv5(32) → norm → ReLU → conv5/2(64) → norm → ReLU → conv5(64) → norm → ReLU → GAP → linear.

    The 1-D signal is a ``(N, C, 1, L)`` image to the norms, so every channels-first (2-D) norm drops in.
    """

    def __init__(self, norm: NormSpec, *, width: int = 32, num_classes: int = 10):
        super().__init__()
        w1, w2 = width, 2 * width
        self.convs = nn.ModuleList(
            [nn.Conv1d(1, w1, 5, padding=2, bias=False), nn.Conv1d(w1, w2, 5, stride=2, padding=2, bias=False),
             nn.Conv1d(w2, w2, 5, padding=2, bias=False)]
        )  # fmt: skip
        self.norms = nn.ModuleList([make_norm(norm, w1), make_norm(norm, w2), make_norm(norm, w2)])
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x).unsqueeze(2)).squeeze(2))
        return self.head(x.mean(dim=2))


class SceneCNN(nn.Module):
    """CNN for 32×32 scenes: conv3×3 → norm → ReLU at widths 16, 32, 64, 64, a 2×2 max-pool after
    each of the first three, a global **max** pool, linear (~3.4 M multiply-adds per image).

    Why this shape (BN, batch 64, Adam 3e-3, seed 0, 2026-12-03): the earlier version (stride-2
    convolutions instead of the pools, a global *average* pool) stayed near chance for two epochs and
    reached 25% after four; the pools alone reach 57%, the global max pool on top 78%. The max pools
    give a 38-pixel receptive field (a whole object has radius ≤ 11 px), and a global max pool reads
    "is this shape anywhere": the object covers 10–40% of the image, and an average dilutes its
    evidence with the background and clutter. ``conv``/``act`` as in ``SmallCNN``.
    """

    def __init__(
        self,
        norm: NormSpec,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        conv: Callable[..., nn.Module] = nn.Conv2d,
        act: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True),
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [conv(c_in, c_out, 3, padding=1, bias=False), make_norm(norm, c_out), act()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))
