"""PowerNorm module (Shen et al. 2020), channels-last token norm with an approximate backward.

State-dict keys are the official code's (``sIncerass/powernorm``, ``MaskPowerNorm``):
``weight``, ``bias``, ``running_phi``, ``ema_gz``, ``iters``. The official buffers are shaped
``(1, C, 1, 1)``; ours are ``(C,)`` and official checkpoints are reshaped on load.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from normkit._compat import MISSING, renamed_argument
from normkit.functional.power_norm import _check_count, _check_unit, power_norm
from normkit.nn._base import check_module_args, options_repr, set_options, sync_reducer
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

POWER_NORM = Paper(
    "PowerNorm: Rethinking Batch Normalization in Transformers",
    2020,
    "2003.07845",
    "Shen, Yao, Gholami, Mahoney, Keutzer",
)


def check_num_features(num_features: int) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")


def register_token_state(
    module: nn.Module, running: str, device: torch.device | str | None, dtype: torch.dtype | None
) -> None:
    """The state PowerNorm and UN share, under the official names: ``weight``/``bias`` (or None when
    ``module.affine`` is False), the running statistic ``running`` (ones), ``ema_gz`` (zeros, the
    approximate backward's statistic) and the step counter ``iters`` (long, shape (1,))."""
    c = module.num_features
    fk: dict[str, Any] = {"device": device, "dtype": dtype}
    for name in ("weight", "bias"):
        if module.affine:
            setattr(module, name, nn.Parameter(torch.empty(c, **fk)))
        else:
            module.register_parameter(name, None)
    module.register_buffer(running, torch.ones(c, **fk))
    module.register_buffer("ema_gz", torch.zeros(c, **fk))
    module.register_buffer("iters", torch.zeros(1, dtype=torch.long, device=device))


def reset_affine(module: nn.Module) -> None:
    """weight 1, bias 0 (when the module has them)."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_norm(
    "powernorm",
    family="batch",
    paper=POWER_NORM,
    layout="channels_last",
    batch_dependent=True,
    train_eval_differ=True,
    description="per-channel running quadratic mean (no centring) with an approximate backward",
    aliases=("pn", "power_norm"),
)
class PowerNorm(nn.Module):
    """Power Normalization for transformer tokens ``(B, T, C)`` or ``(N, C)``.

    Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020,
    arXiv:2003.07845. Per channel, over all (non-padded) tokens of the batch, with t the
    number of training forward calls so far (``iters``, counted before the call)::

        x    ← x / sqrt(mean_{group}(x²) + 1e-5)       GroupScaling, per token (official code)
        ψ²_B = mean(x²)                                  quadratic mean, no centring
        z    = x / sqrt(ψ²_B + eps)  for t ≤ warmup_iters, else x / sqrt(running_phi + eps)
        y    = weight · z + bias
        running_phi ← alpha_fwd · running_phi + (1 − alpha_fwd) · ψ²_B   (cumulative mean first while t < warmup)

    The backward is the paper's approximate backpropagation, a custom autograd Function:
    ``ĝ = g − (1 − alpha_bkw)·ema_gz·z``, ``ema_gz += mean(ĝ·z)``, ``dx = ĝ / sqrt(ψ²_B + eps)``
    with ``g = dL/dy · weight`` (see :func:`normkit.functional.power_norm.power_norm`). Eval
    uses ``running_phi``: a per-channel affine map after GroupScaling.

    Defaults are the official ``MaskPowerNorm``'s: eps 1e-5, alpha_fwd = alpha_bkw = 0.9,
    warmup_iters 10000 (the IWSLT recipe passes its LR warmup, 8000), num_groups 1 (the
    official ``group_num``; the fairseq wiring passes the number of attention heads, 4 on IWSLT).
    ``group_num=`` still works, with a ``FutureWarning``: ``num_groups`` is the name every other
    grouped layer here (and torch's ``GroupNorm``) uses.

    ``forward(x, pad_mask=None)``: ``pad_mask`` is the official (fairseq) convention, a bool
    tensor shaped ``x.shape[:-1]`` with **True = padding**; padded tokens are left out of ψ²_B.

    Divergences from the paper, all defaulting to the official code:
    ``num_groups=None`` removes GroupScaling (not in the paper); ``paper_exact=True`` divides
    the backward by the forward's denominator (the paper's ψ_{t−1}) instead of the batch's;
    warmup and the cumulative-mean running update exist in the code only; ``ema_gz`` averages
    over padded positions too. Beyond the code: ``affine=False`` drops weight and bias (the
    official flag is ignored), buffers are ``(C,)``, and ``stats_dtype`` sets the accumulation
    dtype (float32 for half inputs). ``process_group`` synchronizes ψ²_B and the backward's
    ``mean(ĝ·z)`` over the processes in training (:mod:`normkit.sync`); eval never communicates.

    The counter counts *training forward calls*, not optimizer steps. All state (``iters``,
    ``running_phi``, ``ema_gz``) is in buffers, so a checkpoint resumes exactly.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        num_groups: int | None = MISSING,
        *,
        group_eps: float = 1e-5,
        paper_exact: bool = False,
        stats_dtype: torch.dtype | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        group_num: int | None = MISSING,
    ) -> None:
        super().__init__()
        num_groups = renamed_argument(num_groups, group_num, new="num_groups", old="group_num", where="PowerNorm", default=1)
        set_options(self, eps, stats_dtype=stats_dtype, process_group=process_group)
        check_module_args(group_eps, None)
        check_num_features(num_features)
        if num_groups is not None and (
            isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or num_features % num_groups
        ):
            raise ValueError(f"num_groups={num_groups!r} must be None or a positive divisor of num_features={num_features}")
        self.num_features = num_features
        self.eps = float(eps)
        self.alpha_fwd = _check_unit(alpha_fwd, "alpha_fwd")
        self.alpha_bkw = _check_unit(alpha_bkw, "alpha_bkw")
        self.affine = bool(affine)
        self.warmup_iters = _check_count(warmup_iters, "warmup_iters")
        self.num_groups = num_groups
        self.group_eps = float(group_eps)
        self.paper_exact = bool(paper_exact)
        register_token_state(self, "running_phi", device, dtype)
        self.reset_parameters()

    @property
    def group_num(self) -> int | None:
        """Old name of :attr:`num_groups` (read with a ``FutureWarning``)."""
        warnings.warn("PowerNorm.group_num is renamed to num_groups", FutureWarning, stacklevel=2)
        return self.num_groups

    def reset_running_stats(self) -> None:
        """Back to the start: ``running_phi`` = 1, ``ema_gz`` = 0, ``iters`` = 0 (warmup runs again)."""
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.iters.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # official checkpoints store running_phi / ema_gz as (1, C, 1, 1)
        for name in ("running_phi", "ema_gz"):
            v = state_dict.get(prefix + name)
            if isinstance(v, Tensor) and v.dim() != 1 and v.numel() == self.num_features:
                state_dict[prefix + name] = v.reshape(self.num_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return power_norm(
            x,
            self.running_phi,
            self.weight,
            self.bias,
            self.training,
            self.alpha_fwd,
            self.eps,
            ema_gz=self.ema_gz,
            iters=self.iters,
            alpha_bkw=self.alpha_bkw,
            warmup_iters=self.warmup_iters,
            num_groups=self.num_groups,
            group_eps=self.group_eps,
            pad_mask=pad_mask,
            paper_exact=self.paper_exact,
            reducer=sync_reducer(self),
            stats_dtype=self.stats_dtype,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"affine={self.affine}, warmup_iters={self.warmup_iters}, num_groups={self.num_groups}"
        )
        if self.paper_exact:
            s += ", paper_exact=True"
        return s + options_repr(self)
