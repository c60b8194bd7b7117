"""``convert_sync_norms``: synchronize every batch-dependent norm of a model over a process group."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.nn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.nn.batch_variants import GhostBatchNorm
from normkit.nn.replace import replace_modules
from normkit.registry import norm_info_of
from normkit.sync import ProcessGroupLike, check_process_group

#: torch's classes converted to normkit's (same keys, same math; normkit's also sync on CPU/gloo)
_TORCH_BN: dict[type[nn.Module], type[BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: BatchNorm,
}


def _from_torch(m: _BatchNorm, group: ProcessGroupLike) -> BatchNorm:
    """A normkit BatchNorm holding ``m``'s own parameter and buffer objects (shared, not copied)."""
    new = _TORCH_BN[type(m)](
        m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group=group, device="meta",
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = m._buffers.get(name)
    new.train(m.training)
    return new


def convert_sync_norms(model: nn.Module, process_group: ProcessGroupLike = None) -> nn.Module:
    """Make every batch-dependent norm of ``model`` use the statistics of the whole distributed batch.

    In place (returns the model, or the new root when the root itself is a torch BatchNorm):

    * torch ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (exactly these classes; a subclass with extra
      behaviour, e.g. a fused activation, is left alone) become normkit's ``BatchNorm1d/2d/3d`` /
      ``BatchNorm`` holding **the same parameter and buffer objects** (an optimizer built before the
      conversion keeps working; state-dict keys are unchanged);
    * every normkit layer with a ``process_group`` option (BatchNorm and its variants, BatchRenorm,
      BCN/EstBN, EvoNorm-B0, IBN, PowerNorm, Unified Norm, RepBN/PRepBN, LOAN, ...) gets
      ``process_group`` set. :class:`~normkit.nn.GhostBatchNorm` keeps its virtual batches local (its
      statistics are meant to come from ``virtual_batch_size`` samples).

    ``process_group=None`` means the default (world) group, as torch's ``convert_sync_batchnorm``; it is
    resolved at the first training call, so the model may be converted before ``init_process_group``.
    Synchronization happens in training only; eval never communicates. The synchronized sums are
    taken about each layer's synchronized mean of its previous training call (equal on every process
    by construction; the first call computes the exact global mean first: two collectives, then one
    per call — :func:`normkit.stats.synced_sums`). Running statistics must still start equal on every
    process for the replicas to agree: DDP broadcasts rank 0's buffers when it wraps the model (and
    before every forward by default), otherwise call :func:`normkit.distributed.broadcast_norm_buffers`
    once. A registered batch-dependent layer with no ``process_group`` option gets a warning naming it.
    """
    group = check_process_group("world" if process_group is None else process_group)
    report = replace_modules(model, lambda _, m: type(m) in _TORCH_BN, lambda _, m: _from_torch(m, group))
    model = report.model
    left = []
    for name, m in model.named_modules():
        if isinstance(m, GhostBatchNorm):
            continue
        if "process_group" in vars(m):
            m.process_group = group
        elif (info := norm_info_of(m)) is not None and info.batch_dependent and not any(
            "process_group" in vars(c) for c in m.modules()
        ):
            left.append(f"{name or '<root>'} ({type(m).__name__})")
    if left:
        warnings.warn(
            "convert_sync_norms: these batch-dependent layers have no process_group option and stay "
            "per-process: " + ", ".join(left),
            stacklevel=2,
        )
    return model
