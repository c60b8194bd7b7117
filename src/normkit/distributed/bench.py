"""Cost of synchronized statistics: ``python -m normkit.distributed.bench [--nproc 2]``.

Spawns ``--nproc`` gloo processes on this machine (or runs inside ``torchrun``) and reports, from rank 0:

* one BatchNorm2d / PowerNorm layer call (forward + backward) synchronized vs per-process;
* the values and bytes each synchronized call sends in steady state (forward; the backward sends as many
  again; a layer's first call sends one more ``(n, Σx)`` to start its shift, ``normkit.stats.synced_sums``);
* the DDP step time (forward, backward, SGD) of a small ResNet (BatchNorm) and a small transformer
  (PowerNorm in place of LayerNorm) with every norm synchronized vs per-process.

Times are medians over ``--iters`` calls after warm-up, one thread per process. On a shared CPU machine
they are noisy; the collective's latency (gloo over loopback TCP) dominates small layers.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _median_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return t.item() * 1e3


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def small_resnet(width: int = 32, blocks: int = 4, classes: int = 10) -> nn.Module:
    """A stem + ``blocks`` basic residual blocks, 2·blocks + 1 BatchNorms."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         *[_Block(width) for _ in range(blocks)], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        from normkit.nn.power_norm import PowerNorm

        self.n1, self.n2 = PowerNorm(d), PowerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


def small_transformer(d: int = 128, heads: int = 4, layers: int = 2, classes: int = 10) -> nn.Module:
    """``layers`` pre-norm encoder layers with PowerNorm (the PowerNorm paper's placement), 2·layers norms."""
    return nn.Sequential(*[_Layer(d, heads) for _ in range(layers)], _MeanHead(d, classes))


class _MeanHead(nn.Module):
    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(1))


def _layer_rows(iters: int) -> list[str]:
    import normkit.sync as sync
    from normkit.nn.batch_norm import BatchNorm2d
    from normkit.nn.power_norm import PowerNorm

    rows = []
    for name, build, shape in (
        ("BatchNorm2d(64)", lambda pg: BatchNorm2d(64, process_group=pg), (8, 64, 16, 16)),
        ("PowerNorm(256)", lambda pg: PowerNorm(256, warmup_iters=0, process_group=pg), (8, 64, 256)),
    ):
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        ms = {}
        for label, pg in (("local", None), ("synced", "world")):
            m = build(pg).train()

            def step(m: nn.Module = m, x: torch.Tensor = x, g: torch.Tensor = g) -> None:
                x.grad = None
                m(x).backward(g)

            ms[label] = _median_ms(step, iters)
        sent: list[int] = []
        orig = sync.all_reduce_sum

        def counting(t: torch.Tensor, group: Any, sent: list[int] = sent, orig: Callable = orig) -> torch.Tensor:
            # a sum that carries gradient is all-reduced again by its autograd backward, same size
            sent.extend([t.numel() * t.element_size()] * (2 if t.requires_grad else 1))
            return orig(t, group)

        warm = build("world").train()
        warm(x).backward(g)  # the first call also computes the exact global mean its shift starts from
        sync.all_reduce_sum = counting
        try:
            warm(x).backward(g)
        finally:
            sync.all_reduce_sum = orig
        c = shape[1] if "Batch" in name else shape[-1]
        rows.append(f"| {name}, per rank {tuple(shape)} | {ms['local']:.2f} | {ms['synced']:.2f} | "
                    f"{ms['synced'] - ms['local']:+.2f} | {len(sent)} | {sum(sent) // 4} values = {sum(sent)} B "
                    f"(C = {c}) |")
    return rows


def _ddp_rows(iters: int) -> list[str]:
    from normkit.distributed import convert_sync_norms

    rows = []
    for name, build, make in (
        ("ResNet (9 BN, width 32), 16×3×32×32 per rank", small_resnet,
         lambda: (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))),
        ("transformer (4 PowerNorm, d 128), 8×64 tokens per rank", small_transformer,
         lambda: (torch.randn(8, 64, 128), torch.randint(0, 10, (8,)))),
    ):
        ms = {}
        for label in ("local", "synced"):
            torch.manual_seed(0)
            model = build()
            if label == "synced":
                model = convert_sync_norms(model)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
            x, y = make()

            def step(ddp: nn.Module = ddp, opt: torch.optim.Optimizer = opt, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()

            ms[label] = _median_ms(step, iters)
            del ddp
        rows.append(f"| {name} | {ms['local']:.1f} | {ms['synced']:.1f} | "
                    f"{100 * (ms['synced'] / ms['local'] - 1):+.0f}% |")
    return rows


def run(iters: int = 20) -> list[str]:
    """The report's lines (every rank computes; rank 0 prints)."""
    world = dist.get_world_size()
    lines = [f"## synchronized statistics, {world} gloo processes, 1 thread each ({torch.__version__})", "",
             "| layer call (forward + backward) | per-process ms | synced ms | overhead ms | collectives (fwd + bwd) | "
             "sent per call (float32) |", "|---|---|---|---|---|---|"]
    lines += _layer_rows(iters)
    lines += ["", "| DDP step (forward, backward, SGD) | per-process norms ms | synced norms ms | overhead |",
              "|---|---|---|---|"]
    lines += _ddp_rows(iters)
    return lines


def _worker(rank: int, world: int, port: int, iters: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lines = run(iters)
        if rank == 0:
            print("\n".join(lines), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        lines = run(args.iters)
        if dist.get_rank() == 0:
            print("\n".join(lines), flush=True)
        dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.nproc, port, args.iters), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
