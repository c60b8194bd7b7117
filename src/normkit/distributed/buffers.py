"""Running statistics and counters of norm layers made equal across processes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.registry import norm_info_of
from normkit.sync import ProcessGroupLike, resolve_group


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The norm layers of ``model`` whose buffers these utilities handle: torch's ``_BatchNorm``
    (incl. ``SyncBatchNorm``), every registered normkit norm, and any module with a ``process_group``
    option (the containers inside normkit's layers)."""
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) or norm_info_of(m) is not None or "process_group" in vars(m)
    ]


def _own_buffers(model: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    seen: set[int] = set()
    out = []
    for m in norm_modules(model):
        for name, b in m.named_buffers(recurse=False):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append((m, name, b))
    return out


@torch.no_grad()
def broadcast_norm_buffers(model: nn.Module, src: int = 0, process_group: ProcessGroupLike = None) -> None:
    """Copy every buffer of every norm layer (running statistics, counters, PowerNorm/UN windows and
    EMAs, PRepBN's schedule ...) from process ``src`` to all others (timm's ``distribute_bn(reduce=False)``)."""
    import torch.distributed as dist

    group = resolve_group("world" if process_group is None else process_group)
    for _, _, b in _own_buffers(model):
        dist.broadcast(b, src=dist.get_global_rank(group, src) if group is not dist.group.WORLD else src, group=group)


@torch.no_grad()
def average_norm_buffers(model: nn.Module, process_group: ProcessGroupLike = None) -> None:
    """Average the floating buffers of every norm layer across processes; integer counters are taken
    from process 0 (an average of step counters is not a step).

    A ``running_var`` next to a ``running_mean`` is combined by the law of total variance,
    ``mean_r(var_r) + mean_r(mean_r²) − mean_r(mean_r)²`` (timm's ``distribute_bn`` averages the
    variances alone, which ignores how much the means differ between processes). Every process is
    weighted equally (the buffers do not record how many samples made them). One ``all_reduce`` of all
    floating buffers packed together, plus one broadcast per integer buffer.
    """
    import torch.distributed as dist

    group = resolve_group("world" if process_group is None else process_group)
    world = dist.get_world_size(group)
    bufs = _own_buffers(model)
    floats = [(m, n, b) for m, n, b in bufs if b.is_floating_point()]
    pairs = {id(m): m for m, n, _ in floats if n == "running_var" and isinstance(getattr(m, "running_mean", None), Tensor)}
    parts = [b.double().reshape(-1) for _, _, b in floats]
    sq_means = [m.running_mean.double().square().reshape(-1) for m in pairs.values()]
    if parts:
        flat = torch.cat(parts + sq_means)
        dist.all_reduce(flat, group=group)
        flat /= world
        start, avg = 0, {}
        for m, n, b in floats:
            avg[(id(m), n)] = flat[start:start + b.numel()].reshape(b.shape)
            start += b.numel()
        mean_sq = {}
        for key, m in pairs.items():
            n = m.running_mean.numel()
            mean_sq[key] = flat[start:start + n].reshape(m.running_mean.shape)
            start += n
        for m, n, b in floats:
            v = avg[(id(m), n)]
            if n == "running_var" and id(m) in pairs:
                v = v + mean_sq[id(m)] - avg[(id(m), "running_mean")].square()
            b.copy_(v.to(b.dtype))
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    for _, _, b in bufs:
        if not b.is_floating_point():
            dist.broadcast(b, src=src, group=group)
