"""Synchronized statistics over ``torch.distributed``: the one cross-process mechanism.

Data-parallel training gives every batch-dependent norm only its rank's slice of the batch. To
normalize with the statistics of the *global* batch, a norm declares the per-channel sums it needs
(count, Σx, Σx² — or Σx² alone for PowerNorm, masked counts, the backward's Σg·z ...); this module
packs them into **one** tensor and sums it across the process group with **one** ``all_reduce`` per
call (:func:`reduce_packed`). Sums, not means, are reduced, so the result is count-weighted: uneven
per-rank batches, masks that differ per rank and a rank with zero samples (it adds zeros) are exact.
How the sums become a mean and a variance without catastrophic cancellation is the statistics engine's
business (:func:`normkit.stats.synced_sums`): they are taken about a shift ``K`` common to all ranks, the
layer's synchronized mean of its previous training call, which a layer's reducer carries in a
:class:`ShiftMemory` (equal on every rank: it is computed from the all-reduced sums).

The collective is ``torch.distributed._functional_collectives.all_reduce``: it is differentiable
(its backward is again an ``all_reduce(SUM)`` of the incoming gradient, so input gradients equal the
single-process gradients on the concatenated batch, as in SyncBatchNorm, arXiv:1711.07240 /
torch's ``SyncBatchNorm``) and traceable by ``torch.compile(fullgraph=True)`` (no graph break; the
deprecated ``torch.distributed.nn.functional.all_reduce`` is neither). Works with gloo on CPU and
NCCL on CUDA (torch's own ``SyncBatchNorm`` raises for CPU tensors).

A process group is named by a ``ProcessGroup`` object or the string ``"world"`` (the default group,
resolved at call time so a layer can be built before ``init_process_group``). ``None`` means no
synchronization. Calling with a group before ``init_process_group`` raises a ``ValueError`` that says
so; a group of one process is a (cheap) no-op collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: what a layer's ``process_group=`` accepts: a ``torch.distributed.ProcessGroup``, ``"world"`` or None
ProcessGroupLike = Any

_calls = [0]


def collective_calls() -> int:
    """How many synchronizing collectives this process has issued in eager mode (forward and backward).

    A counter for tests and benchmarks ("one collective per layer call", "eval never communicates");
    collectives inside a compiled graph are not counted.
    """
    return _calls[0]


def resolve_group(process_group: ProcessGroupLike) -> Any:
    """The ``ProcessGroup`` a layer's ``process_group`` names; ValueError when there is none to use."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("process_group was given but torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise ValueError(
            "process_group was given but no default process group is initialized: call "
            "torch.distributed.init_process_group(...) (or launch with torchrun) before the first training "
            "call, or build the layer with process_group=None for no synchronization"
        )
    if isinstance(process_group, str):
        if process_group != "world":
            raise ValueError(f"process_group must be a ProcessGroup, 'world' or None, got the string {process_group!r}")
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, 'world' or None, "
                        f"got {type(process_group).__name__}")
    return process_group


def check_process_group(process_group: ProcessGroupLike) -> ProcessGroupLike:
    """Validate a layer's ``process_group`` argument at construction (no group needs to exist yet)."""
    if process_group is None or process_group == "world":
        return process_group
    import torch.distributed as dist

    if isinstance(process_group, str) or not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, 'world' or None, got {process_group!r}")
    return process_group


def _sum_over(t: Tensor, group: Any) -> Tensor:
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_reduce(t.contiguous(), "sum", group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


class _AllReduceSum(torch.autograd.Function):
    """Forward ``Σ_ranks t``; backward ``Σ_ranks grad`` (the adjoint of a sum that every rank receives).

    Spelled out as an autograd Function so the backward collective is explicit, the same in eager
    mode and in the graph ``torch.compile`` traces (dynamo inlines the Function; the collectives are
    functional ops, so ``fullgraph=True`` holds).
    """

    @staticmethod
    def forward(ctx, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _sum_over(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _sum_over(grad, ctx.group), None


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """``Σ_ranks t`` over ``group``, differentiable (backward: ``all_reduce(SUM)`` of the gradient)."""
    if not torch.compiler.is_compiling():
        _calls[0] += 1
    if t.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(t, group)
    return _sum_over(t, group)


class ShiftMemory:
    """A layer's synchronized means from its previous training call: the shifts of its next one.

    Synchronized centred sums are taken about a shift ``K`` that must be the same on every process
    (:func:`normkit.stats.synced_sums`). The last synchronized batch mean is such a value — every
    process computes it from the same all-reduced sums — and is close to the next batch's mean, so
    ``Σ(x−K)² − n·(mean−K)²`` loses only ``log10((μ−K)²/σ²)`` digits. ``means[i]`` holds the i-th
    statistic a call synchronizes (a layer may sync several in its one collective: LOAN's two BNs,
    RegionNorm's two regions). Non-finite means are not kept (a NaN batch does not poison later calls).

    A plain attribute of the layer, not a buffer: it is not state (never saved or loaded) and is
    converted to the input's device and dtype where it is used. A missing or mismatched slot (a fresh
    layer, another input shape) makes the engine compute the exact global mean first, one extra
    collective. Correctness never depends on it, only the rounding does: any value common to all
    processes is a valid shift.
    """

    __slots__ = ("means",)

    def __init__(self) -> None:
        self.means: dict[int, Tensor] = {}

    def get(self, slot: int, like: Tensor) -> Tensor | None:
        """The kept mean of ``slot`` in ``like``'s shape, device and dtype, or None (first call, other shape)."""
        k = self.means.get(slot)
        if k is None or k.shape != like.shape:
            return None
        return k.to(device=like.device, dtype=like.dtype)

    def put(self, slot: int, mean: Tensor, fallback: Tensor) -> None:
        """Keep ``mean`` (detached; ``fallback`` where it is not finite) as the shift of ``slot``'s next call."""
        mean = mean.detach()
        self.means[slot] = torch.where(torch.isfinite(mean), mean, fallback.detach())

    def __repr__(self) -> str:
        return f"ShiftMemory({len(self.means)} statistics)"


class GroupSum:
    """The statistics engine's ``Reducer`` for a process group: ``t ↦ Σ_ranks t`` (autograd-aware).

    ``memory``: the calling layer's :class:`ShiftMemory` (``normkit.nn._base.sync_reducer`` passes it);
    the engine numbers the statistics of one call through :meth:`next_slot`, so build one reducer per
    layer call. Reducers of the same group and memory compare equal, so ``torch.compile`` guards do
    not multiply.
    """

    __slots__ = ("process_group", "memory", "_slot")

    def __init__(self, process_group: ProcessGroupLike = "world", memory: ShiftMemory | None = None) -> None:
        self.process_group = check_process_group(process_group)
        self.memory = memory
        self._slot = 0

    def __call__(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t, resolve_group(self.process_group))

    def next_slot(self) -> int:
        """The index of the next statistic this call synchronizes (its slot in :attr:`memory`)."""
        self._slot += 1
        return self._slot - 1

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GroupSum) and other.process_group is self.process_group
                and other.memory is self.memory)

    def __hash__(self) -> int:
        return hash(("GroupSum", id(self.process_group), id(self.memory)))

    def __repr__(self) -> str:
        return f"GroupSum({self.process_group!r})"


def reduce_packed(parts: Sequence[Tensor], reducer: Any) -> list[Tensor]:
    """Sum several tensors across processes with one collective: pack, ``reducer`` once, unpack.

    ``parts`` are promoted to one floating dtype (counts travel as floats; exact up to 2^53 in float64,
    2^24 in float32 — the accumulation dtype of every engine call). Returns the summed parts in their
    original shapes. This is the only place a norm's declared sums meet the collective.
    """
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = torch.cat([p.to(dtype).reshape(-1) for p in parts])
    summed = reducer(flat)
    out, start = [], 0
    for p in parts:
        n = p.numel()
        out.append(summed[start:start + n].reshape(p.shape))
        start += n
    return out
