"""BatchNorm variants: Ghost BatchNorm and Batch Renormalization.

Both subclass :class:`normkit.nn.batch_norm.BatchNorm` (and so torch's ``_BatchNorm``): the
state-dict keys are torch's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), a ``BatchNorm2d`` checkpoint loads into them and back, and
``isinstance(m, nn.modules.batchnorm._BatchNorm)`` holds (so BN-aware tooling — weight-decay
filters, ``freeze_batch_norm_2d``-style helpers — treats them as BatchNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.functional._core import check_channels_first, check_momentum
from normkit.functional.batch_variants import (
    _renorm_schedule,
    batch_renorm,
    batch_renorm_limits,
    check_virtual_batch_size,
    ghost_batch_norm,
    momentum_step,
)
from normkit.nn._base import options_repr, sync_reducer
from normkit.nn.batch_norm import BatchNorm
from normkit.registry import Paper, register_norm
from normkit.sync import ProcessGroupLike


def batch_norm_step(bn: BatchNorm) -> float:
    """One training call's bookkeeping of a BatchNorm submodule driven by a fused parent (IBN, BCN):
    ``num_batches_tracked += 1`` and the momentum factor, as :class:`BatchNorm` does (``momentum=None``:
    the cumulative ``1 / num_batches_tracked``). Returns 0.0 where no running statistics are tracked."""
    if not (bn.training and bn.track_running_stats and bn.num_batches_tracked is not None):
        return 0.0
    return momentum_step(bn.momentum, bn.num_batches_tracked)

GHOST_BN = Paper(
    "Train longer, generalize better: closing the generalization gap in large batch training of neural networks",
    2017,
    "1705.08741",
    "Hoffer, Hubara, Soudry",
)
BATCH_RENORM = Paper(
    "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models",
    2017,
    "1702.03275",
    "Ioffe",
)


@register_norm(
    "ghostbn",
    family="batch",
    paper=GHOST_BN,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="BatchNorm whose training statistics come from virtual batches of virtual_batch_size samples",
    aliases=("ghost_batch_norm", "gbn"),
    sample_kwargs=lambda channels: {"virtual_batch_size": 2},
)
class GhostBatchNorm(BatchNorm):
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, arXiv:1705.08741, Algorithm 1).

    Training splits the batch along dim 0 into virtual ("ghost") batches of
    ``virtual_batch_size`` samples and batch-normalizes each with its own statistics::

        y[k] = (x[k] − μ_k) / sqrt(σ²_k + eps) · w + b       for each chunk x[k]

    * **Uneven batches**: chunks are consecutive, ``x.split(virtual_batch_size)``; when N is
      not divisible the **last chunk is smaller** (N = 10, size 4 → 4, 4, 2). A last chunk
      with a single value per channel raises a ValueError naming N and the size. (TabNet's
      ``GBN`` uses ``x.chunk(ceil(N / size))`` instead, which can give equal chunks smaller
      than ``virtual_batch_size``, e.g. 3, 3, 3 for N = 9, size 4.)
    * **Running statistics** are updated once per virtual batch, sequentially, as the common
      implementations do by calling BatchNorm on each chunk: a batch of k chunks applies k
      momentum steps and adds k to ``num_batches_tracked``. Choose ``momentum`` accordingly
      (the per-batch decay is ``(1 − momentum)^k``).
    * **Eval** is plain BatchNorm with the running statistics (independent of the batch size);
      with ``track_running_stats=False`` eval uses ghost-batch statistics as training does.

    Defaults: ``virtual_batch_size=128`` (the paper's ghost batch size), eps 1e-5, momentum 0.1
    (torch's). ``channels_last=True`` takes ``(N, *, C)`` input. Keys are torch's BatchNorm keys.

    **Distributed**: ghost batches stay local to each process (there is no ``process_group``;
    :func:`normkit.distributed.convert_sync_norms` leaves GhostBatchNorm alone). The virtual batch
    *is* the point of the method — its statistics are meant to come from ``virtual_batch_size``
    samples, whatever the global batch.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        stats_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size, "GhostBatchNorm")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            stats_dtype=stats_dtype,
            channels_last=channels_last,
            backend=backend,
            device=device,
            dtype=dtype,
        )

    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        self._check_input_dim(x)
        check_channels_first(x, self.num_features, type(self).__name__)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return ghost_batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            self.momentum,
            self.eps,
            self.virtual_batch_size,
            num_batches_tracked=self.num_batches_tracked if self.training and self.track_running_stats else None,
            mask=mask,
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        head, _, rest = super().extra_repr().partition(", ")
        return f"{head}, virtual_batch_size={self.virtual_batch_size}, {rest}"


@register_norm(
    "batchrenorm",
    family="batch",
    paper=BATCH_RENORM,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="BatchNorm corrected toward the running statistics by clipped r, d (scheduled r_max, d_max)",
    aliases=("batch_renorm", "brn"),
)
class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017, arXiv:1702.03275, Algorithm 1).

    Training, per channel (μ_B, σ²_B the batch mean and biased variance over (N, *))::

        σ_B = sqrt(σ²_B + eps),  σ = sqrt(running_var + eps),  μ = running_mean
        r = stop_grad(clip(σ_B / σ, 1/r_max, r_max)),  d = stop_grad(clip((μ_B − μ)/σ, −d_max, d_max))
        y = ((x − μ_B) / σ_B · r + d) · w + b
        μ ← μ + momentum·(μ_B − μ),  σ ← σ + momentum·(σ_B − σ)

    Eval: ``y = (x − μ) / σ · w + b`` — plain BatchNorm with the running statistics.

    **Schedule** (``schedule=True``, the paper's ImageNet setting): ``r_max = 1, d_max = 0``
    (plain BatchNorm) for the first ``warmup_steps=5000`` training steps, then linear ramps to
    ``r_max=3`` at ``r_max_end_step=40000`` and ``d_max=5`` at ``d_max_end_step=25000``.
    The step counter is the ``num_batches_tracked`` buffer: it counts training forward calls
    (not optimizer steps — gradient accumulation advances it once per micro-batch), is saved in
    the state dict, and the bounds are computed from it with tensor ops only (no Python branch
    on the counter, so ``torch.compile(fullgraph=True)`` holds). ``schedule=False`` uses the fixed
    ``r_max``/``d_max`` from the first step. The paper's step counts assume ~100k+ steps; scale
    them to your run.

    **Running σ**: with ``running_update="std"`` (default, the paper) the moving average is
    taken over σ_B and stored as ``running_var = σ² − eps``, keeping torch's keys and eval
    formula; ``"var"`` uses torch BatchNorm's update (moving average of the unbiased variance).
    Keras-2's ``renorm=True`` keeps separate ``renorm_mean/renorm_stddev`` averages for r, d and
    ``moving_mean/moving_variance`` for inference; Avalanche's ``BatchRenorm2D`` follows the
    paper's σ average (but increments r_max/d_max per sample without warm-up).

    Defaults: ``momentum=0.01`` (the paper's "relatively fast" update rate α), eps 1e-5.
    ``process_group`` synchronizes μ_B, σ_B over the processes in training (:class:`BatchNorm`).
    Running statistics are required (``track_running_stats`` is always True). A BatchNorm
    checkpoint loads directly (e.g. to fine-tune a BN model with renorm).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        schedule: bool = True,
        warmup_steps: int = 5000,
        r_max_end_step: int = 40000,
        d_max_end_step: int = 25000,
        running_update: str = "std",
        stats_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_momentum(momentum, "BatchRenorm", hint=" (no cumulative average)")
        # validate r_max, d_max and the schedule once, at construction
        batch_renorm_limits(torch.zeros(()), r_max, d_max, warmup_steps, r_max_end_step, d_max_end_step)
        if running_update not in ("std", "var"):
            raise ValueError(f"BatchRenorm: running_update must be 'std' (paper) or 'var' (torch BN), got {running_update!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            True,
            stats_dtype=stats_dtype,
            channels_last=channels_last,
            backend=backend,
            process_group=process_group,
            device=device,
            dtype=dtype,
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.schedule = bool(schedule)
        self.warmup_steps = warmup_steps
        self.r_max_end_step = r_max_end_step
        self.d_max_end_step = d_max_end_step
        self.running_update = running_update

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` in force at the current ``num_batches_tracked`` (as tensors)."""
        if not self.schedule:
            t = self.num_batches_tracked
            return torch.full_like(t, self.r_max, dtype=torch.float32), torch.full_like(t, self.d_max, dtype=torch.float32)
        return _renorm_schedule(
            self.num_batches_tracked, self.r_max, self.d_max, self.warmup_steps, self.r_max_end_step, self.d_max_end_step
        )

    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        self._check_input_dim(x)
        check_channels_first(x, self.num_features, type(self).__name__)
        r_max: float | Tensor = self.r_max
        d_max: float | Tensor = self.d_max
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.schedule:
                r_max, d_max = self.current_limits()
        return batch_renorm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
            r_max,
            d_max,
            running_update=self.running_update,
            mask=mask,
            reducer=sync_reducer(self),
            stats_dtype=self.stats_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        s += f", r_max={self.r_max}, d_max={self.d_max}"
        if self.schedule:
            s += f", warmup_steps={self.warmup_steps}, r_max_end_step={self.r_max_end_step}, d_max_end_step={self.d_max_end_step}"
        else:
            s += ", schedule=False"
        if self.running_update != "std":
            s += f", running_update={self.running_update!r}"
        if self.channels_last:
            s += ", channels_last=True"
        return s + options_repr(self)
