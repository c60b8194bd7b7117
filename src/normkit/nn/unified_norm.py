"""Unified Normalization module (Yang et al. 2022), channels-last token norm.

State-dict keys and shapes are the official code's (``hikvision-research/Unified-Normalization``,
``UN1d``): ``weight``, ``bias``, ``running_var``, ``ema_gz``, ``iters``, ``buffer_x2``,
``buffer_gz``, ``skip_counter``; official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normkit.functional.power_norm import _check_count
from normkit.functional.unified_norm import resolve_momentum, unified_norm
from normkit.nn._base import options_repr, set_options, sync_reducer
from normkit.nn.power_norm import check_num_features, register_token_state, reset_affine
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike

UNIFIED_NORM = Paper(
    "Unified Normalization for Accelerating and Stabilizing Transformers",
    2022,
    "2208.01313",
    "Yang, Zhang, Lan, Yang, Li, Tan, Xiao, Pu",
)


def _windows(window_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(window_size, int) and not isinstance(window_size, bool):
        sizes: tuple[Any, ...] = (window_size, window_size)
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        sizes = tuple(window_size)
    else:
        raise ValueError(f"window_size must be an int or a (forward, backward) pair of ints, got {window_size!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"window sizes must be positive ints, got {window_size!r}")
    return sizes[0], sizes[1]


@register_norm(
    "unifiednorm",
    family="batch",
    paper=UNIFIED_NORM,
    layout="channels_last",
    batch_dependent=True,
    train_eval_differ=True,
    description="windowed geometric-mean x² statistics, outlier filtration, smoothed gradients; affine in eval",
    aliases=("un", "unified_norm"),
)
class UnifiedNorm(nn.Module):
    """Unified Normalization for transformer tokens ``(B, T, C)`` or ``(N, C)``.

    Yang et al., "Unified Normalization for Accelerating and Stabilizing Transformers",
    ACM MM 2022, arXiv:2208.01313. Per channel over all (non-padded) tokens, ``x2 = mean(x²)``
    enters a window of the last W_f batches (``buffer_x2``); after warmup the layer normalizes
    with the window's **geometric mean** (fluctuation smoothing), ``y = w·x/sqrt(var+eps) + b``,
    and ``running_var ← m·running_var + (1−m)·var``. With ``outlier_filtration`` a batch whose
    window has ``AM − GM > var(sqrt(window))·W_f`` in any channel is an outlier: its slot is
    replaced by ``running_var``, it is normalized with its own statistics and ``skip_counter``
    counts it. The custom backward smooths the gradient statistic ``mean(g·z)`` over a window of
    W_b steps (``buffer_gz``) and an EMA (``ema_gz``), and applies a clamped compensation ratio
    r = sqrt(var+eps)/sqrt(running_var+eps) after ``max(compensation_iters, warmup_iters)`` steps.
    Full equations: :func:`normkit.functional.unified_norm.unified_norm`.

    Eval: ``y = w·x/sqrt(running_var + eps) + b``, a per-channel affine map
    (:meth:`scale_shift`) that folds into the adjacent linear layer.

    Defaults are the official ``UN1d``'s: ``window_size=4`` (int, or ``(forward, backward)``),
    ``warmup_iters=4000``, ``outlier_filtration=False`` (the official NLP setting; the CV models
    use True), eps 1e-5, the official ``momentum=0.9`` on the *old* running value, here
    ``momentum=0.1`` in torch's convention (the weight of the new value, as in every other
    normkit layer), or ``decay=0.9`` in the official one (``decay = 1 − momentum``; one or the
    other). Until normkit 0.1 ``momentum`` had the official meaning; a ``momentum`` above 0.5 now
    gives a ``FutureWarning`` (see :func:`~normkit.functional.unified_norm.resolve_momentum`). The
    update is the same as before by default and no state depends on the spelling, so checkpoints
    load unchanged. ``compensation_iters=1000`` is the official hard-coded constant.

    ``forward(x, pad_mask=None)``: the official convention, a bool tensor shaped
    ``x.shape[:-1]`` with **True = padding**; padded tokens are left out of x2 (the backward's
    gradient statistic still averages over all positions, as in the code).

    The counter counts training forward calls. As the official README suggests for fine-tuning,
    :meth:`reset_running_stats` (or ``iters.zero_()``) makes the warmup run again. Beyond the
    code: ``affine=False`` drops weight and bias; ``stats_dtype`` sets the accumulation dtype.
    ``process_group`` synchronizes x2 and the backward's gz over the processes in training, so the
    windows, counters and running variance stay identical on every process (:mod:`normkit.sync`).
    """

    def __init__(
        self,
        num_features: int,
        window_size: int | Sequence[int] = 4,
        warmup_iters: int = 4000,
        outlier_filtration: bool = False,
        eps: float = 1e-5,
        momentum: float | None = None,
        *,
        decay: float | None = None,
        affine: bool = True,
        compensation_iters: int = 1000,
        stats_dtype: torch.dtype | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        set_options(self, eps, stats_dtype=stats_dtype, process_group=process_group)
        check_num_features(num_features)
        self.num_features = num_features
        self.fp_window, self.bp_window = _windows(window_size)
        self.warmup_iters = _check_count(warmup_iters, "warmup_iters")
        self.compensation_iters = _check_count(compensation_iters, "compensation_iters")
        self.outlier_filtration = bool(outlier_filtration)
        self.eps = float(eps)
        #: torch's convention: running_var ← (1 − momentum)·running_var + momentum·var
        self.momentum = resolve_momentum(momentum, decay, "UnifiedNorm")
        self.affine = bool(affine)
        register_token_state(self, "running_var", device, dtype)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("buffer_x2", torch.zeros(self.fp_window, num_features, **fk))
        self.register_buffer("buffer_gz", torch.zeros(self.bp_window, num_features, **fk))
        self.register_buffer("skip_counter", torch.zeros(1, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Back to the initial state: running_var 1, everything else 0 (warmup runs again)."""
        self.running_var.fill_(1.0)
        for b in (self.ema_gz, self.iters, self.buffer_x2, self.buffer_gz, self.skip_counter):
            b.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The eval map as ``y = x·scale + shift`` (per channel), for folding into a linear layer."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = self.bias if self.bias is not None else torch.zeros_like(scale)
        return scale, shift

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return unified_norm(
            x,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            None,
            self.eps,
            decay=1.0 - self.momentum,  # already checked (and warned about) at construction
            ema_gz=self.ema_gz,
            iters=self.iters,
            buffer_x2=self.buffer_x2,
            buffer_gz=self.buffer_gz,
            skip_counter=self.skip_counter,
            warmup_iters=self.warmup_iters,
            outlier_filtration=self.outlier_filtration,
            compensation_iters=self.compensation_iters,
            pad_mask=pad_mask,
            reducer=sync_reducer(self),
            stats_dtype=self.stats_dtype,
        )

    def extra_repr(self) -> str:
        win = self.fp_window if self.fp_window == self.bp_window else (self.fp_window, self.bp_window)
        s = (
            f"{self.num_features}, window_size={win}, warmup_iters={self.warmup_iters}, "
            f"outlier_filtration={self.outlier_filtration}, eps={self.eps}, momentum={self.momentum}"
        )
        if not self.affine:
            s += ", affine=False"
        if self.compensation_iters != 1000:
            s += f", compensation_iters={self.compensation_iters}"
        return s + options_repr(self)
