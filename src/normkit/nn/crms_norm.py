"""Compressed RMSNorm (Pre-CRMSNorm transformers), a channels-last token norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.functional.crms_norm import crms_norm
from normkit.nn._base import describe, options_repr, set_options
from normkit.registry import Paper, register_norm

PRE_CRMS = Paper(
    "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers",
    2023,
    "2305.14858",
    "Jiang, Gu, Zhu, Pan",
)


@register_norm(
    "crmsnorm",
    family="layer",
    paper=PRE_CRMS,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="RMSNorm of a zero-mean d-vector stored compressed in its first d−1 coordinates",
    aliases=("crms", "crms_norm"),
)
class CRMSNorm(nn.Module):
    """Compressed RMSNorm over the last dim (Jiang et al., NeurIPS 2023, arXiv:2305.14858).

    ``num_features`` is the **stored width d − 1**: the input ``(*, d−1)`` holds the first d−1
    coordinates of a zero-mean hidden vector of size d (the last one is ``−Σx``). So a Pre-LN
    model of hidden size 768 converted to Pre-CRMSNorm uses ``CRMSNorm(767)``::

        d = num_features + 1
        y = x / sqrt((Σ_i x_i² + (Σ_i x_i)²) / d + eps)

    which equals ``RMSNorm(d)`` of the decompressed vector (and ``LayerNorm(d)`` of the original,
    uncompressed zero-mean vector) on the stored coordinates. See :mod:`normkit.functional.crms_norm`
    for the exact model conversion (``fold_ln_affine``, ``center_writer``, ``compress_writer``,
    ``compress_reader``, ``compress_zero_mean``, ``decompress``).

    Defaults follow the paper/official code: no affine (LN's γ, β are folded into the next
    linear; the official class subclasses ``nn.LayerNorm`` and so carries *unused* weight and
    bias, which are left out here), eps 1e-5 inside the square root, statistics in float32 for
    half inputs. ``elementwise_affine=True`` (and ``bias=True``) add a plain per-feature affine
    on the d−1 stored features for users who want a standalone norm; it is not LN's γ.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        elementwise_affine: bool = False,
        bias: bool = False,
        *,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"CRMSNorm: num_features (the stored width d-1) must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.num_features:
            shape = describe(x)
            raise ValueError(
                f"CRMSNorm expects input (*, {self.num_features}) — the compressed d-1 = {self.num_features} "
                f"coordinates of a zero-mean {self.num_features + 1}-vector — got {shape}"
            )
        return crms_norm(x, self.weight, self.bias, self.eps, stats_dtype=self.stats_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self.num_features} (d={self.num_features + 1}), eps={self.eps}"
        if self.elementwise_affine:
            s += ", elementwise_affine=True" + (", bias=True" if self.bias is not None else "")
        return s + options_repr(self)
