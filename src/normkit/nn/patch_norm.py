"""Dual PatchNorm: a ViT patch embedding with LayerNorms before and after the projection."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit.backend import get_backend
from normkit.functional.aten import finite_stats
from normkit.nn._base import check_module_args
from normkit.nn.layer_norm import LayerNorm
from normkit.registry import Paper, register_norm

DUAL_PATCHNORM = Paper("Dual PatchNorm", 2023, "2302.01327", "Kumar, Dehghani, Houlsby")


def _patch_tuple(patch_size: int | tuple[int, ...], spatial_dims: int | None) -> tuple[int, ...]:
    if isinstance(patch_size, int) and not isinstance(patch_size, bool):
        ps: tuple = (patch_size,) * (2 if spatial_dims is None else spatial_dims)
    else:
        ps = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else ()
    if not ps or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in ps):
        raise ValueError(f"DualPatchNorm: patch_size must be a positive int or a tuple of positive ints, got {patch_size!r}")
    if spatial_dims is not None and len(ps) != spatial_dims:
        raise ValueError(f"DualPatchNorm: patch_size {patch_size!r} has {len(ps)} entries but spatial_dims={spatial_dims}")
    return ps


def patchify(x: Tensor, patch_size: tuple[int, ...]) -> Tensor:
    """``(N, C, S1…Sk) → (N, Π Si/pi, Π pi · C)``: non-overlapping patches, flattened as ``(p1 … pk c)``.

    Patch order is row-major over the grid (as ``conv(...).flatten(2).transpose(1, 2)``); inside a
    patch the channel varies fastest, as the paper's ``rearrange(img, "b (ht hp) (wt wp) c ->
    b (ht wt) (hp wp c)")`` and lucidrains' ``vit-pytorch``.
    """
    n, c, *sp = x.shape
    k = len(sp)
    grid = [s // p for s, p in zip(sp, patch_size)]
    shape = [n, c]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = x.reshape(shape)
    perm = [0, *range(2, 2 + 2 * k, 2), *range(3, 3 + 2 * k, 2), 1]
    return x.permute(perm).reshape(n, math.prod(grid), math.prod(patch_size) * c)


@register_norm(
    "dualpatchnorm",
    family="layer",
    paper=DUAL_PATCHNORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="ViT patch embedding LN(patch pixels) → Linear → LN(embedding); image (N, C, H, W) → tokens",
    aliases=("dpn", "dual_patchnorm"),
    drop_in=False,
    sample_kwargs=lambda c: {"in_chans": c, "patch_size": 1},
)
class DualPatchNorm(nn.Module):
    """Dual PatchNorm patch embedding (Kumar, Dehghani, Houlsby, TMLR 2023, arXiv:2302.01327).

    Replaces a ViT's patch embedding (the stride-P convolution) by::

        x = patchify(img)          # (N, C, H, W) → (N, HW/P², P·P·C), flattened as (hp wp c)
        x = LN0(x)                 # LayerNorm over the P·P·C pixels of each patch
        x = proj(x)                # Linear(P·P·C → num_features)   (= the stride-P conv)
        x = LN1(x)                 # LayerNorm over num_features
        → tokens (N, num_patches, num_features)

    Position embeddings / cls token are added afterwards as usual; the transformer blocks keep
    their pre-LN. ``num_features`` is the embedding dim D (first argument, timm convention).

    Defaults: ``eps=1e-6`` and affine LayerNorms (the paper's Flax ``nn.LayerNorm`` defaults;
    official code not released), ``patch_size=16``, ``in_chans=3``. The projection is an
    ``nn.Linear`` with torch's default init (Flax: LeCun normal). Conv patch-embedding weights
    (``(D, C, P, P)``, e.g. timm's ``PatchEmbed.proj``) load with :meth:`load_conv_weight`.

    Input: ``(N, in_chans, *spatial)`` with each spatial size divisible by the patch size;
    ``spatial_dims`` (default ``len(patch_size)`` or 2) fixes how many. With an all-ones patch
    (per-position tokens) any number of spatial dims is accepted.
    """

    def __init__(
        self,
        num_features: int,
        in_chans: int = 3,
        patch_size: int | tuple[int, ...] = 16,
        eps: float = 1e-6,
        bias: bool = True,
        *,
        spatial_dims: int | None = None,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_module_args(eps, backend)
        for name, v in (("num_features", num_features), ("in_chans", in_chans)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DualPatchNorm: {name} must be a positive int, got {v!r}")
        self.num_features = num_features
        self.in_chans = in_chans
        self.patch_size = _patch_tuple(patch_size, spatial_dims)
        self.patch_dim = in_chans * math.prod(self.patch_size)
        kw = {"stats_dtype": stats_dtype, "backend": backend, "device": device, "dtype": dtype}
        self.ln0 = LayerNorm(self.patch_dim, eps, bias=bias, **kw)
        self.proj = nn.Linear(self.patch_dim, num_features, bias=bias, device=device, dtype=dtype)
        self.ln1 = LayerNorm(num_features, eps, bias=bias, **kw)

    def reset_parameters(self) -> None:
        self.ln0.reset_parameters()
        self.proj.reset_parameters()
        self.ln1.reset_parameters()

    def _want(self) -> str:
        dims = ["H", "W"] if len(self.patch_size) == 2 else [f"S{i + 1}" for i in range(len(self.patch_size))]
        return f"(N, {self.in_chans}, {', '.join(dims)})"

    def _patch_for(self, x: Tensor) -> tuple[int, ...]:
        k = x.dim() - 2
        if x.dim() < 3 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"DualPatchNorm(in_chans={self.in_chans}, patch_size={self.patch_size}) expects an image {self._want()}, "
                f"got {tuple(x.shape)}"
            )
        if k == len(self.patch_size):
            ps = self.patch_size
        elif all(p == 1 for p in self.patch_size):
            ps = (1,) * k
        else:
            raise ValueError(
                f"DualPatchNorm(patch_size={self.patch_size}) expects {len(self.patch_size)} spatial dims {self._want()}, "
                f"got {k} (input {tuple(x.shape)})"
            )
        bad = [s for s, p in zip(x.shape[2:], ps) if s % p]
        if bad:
            raise ValueError(
                f"DualPatchNorm: spatial size {tuple(x.shape[2:])} is not divisible by patch_size {ps} "
                f"(input {tuple(x.shape)}); crop or pad the image to a multiple of the patch size"
            )
        return ps

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"DualPatchNorm expects a floating-point image tensor, got {getattr(x, 'dtype', type(x))}")
        ps = self._patch_for(x)
        # a bf16/fp16 image with fp32 parameters: the whole embedding runs in the parameters' dtype and the
        # result is rounded to the input's once (rounding between the steps cost ~2 bf16 ulps more)
        wdt = self.proj.weight.dtype
        tokens = self._norm_pixels(patchify(x if x.dtype == wdt else x.to(wdt), ps))
        return self.ln1(self.proj(tokens)).to(x.dtype)

    def _norm_pixels(self, tokens: Tensor) -> Tensor:
        """LN0 over each patch's raw pixels: the one step that sees the input's scale.

        ATen's LayerNorm (what ``"auto"`` runs) computes the float32 variance in float32, so pixels past
        ~1.8e19 give rstd = 0 (NaN out); normkit's LayerNorm checks that only from 2^18 elements. Here the
        per-row rstd ATen returns anyway is checked at every size (one ``amin`` over the rows, a few µs) and an
        overflowed (or NaN) call reruns on normkit's overflow-safe engine (which keeps NaN rows NaN).
        """
        ln = self.ln0
        if (tokens.is_cpu and not torch.compiler.is_compiling() and ln.stats_dtype is None
                and ln.backend in (None, "auto", "native") and (ln.backend is not None or get_backend() == "auto")):
            y, _, rstd = torch.native_layer_norm(tokens, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            if finite_stats(rstd):
                return y
            return F.layer_norm(tokens, ln.normalized_shape, ln.weight, ln.bias, ln.eps, backend="eager")
        return ln(tokens)

    @torch.no_grad()
    def load_conv_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Load a conv patch embedding ``(D, C, *patch)`` into :attr:`proj` (reordered to the (p… c) layout)."""
        want = (self.num_features, self.in_chans, *self.patch_size)
        if tuple(weight.shape) != want:
            raise ValueError(f"DualPatchNorm.load_conv_weight expects a weight of shape {want}, got {tuple(weight.shape)}")
        k = len(self.patch_size)
        self.proj.weight.copy_(weight.permute(0, *range(2, 2 + k), 1).reshape(self.num_features, -1))
        if bias is not None:
            if self.proj.bias is None:
                raise ValueError("DualPatchNorm.load_conv_weight: this layer has no bias (bias=False)")
            self.proj.bias.copy_(bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, in_chans={self.in_chans}, patch_size={self.patch_size}"
