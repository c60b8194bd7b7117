"""Data-parallel training with synchronized BatchNorm and PowerNorm statistics (normkit.distributed).

    torchrun --standalone --nproc-per-node=2 examples/ddp_train.py [--epochs 3] [--batch 8]

A small CNN on scikit-learn's digits (built in, nothing downloaded): two conv + torch ``BatchNorm2d``
blocks, then the 4×4 positions as tokens through normkit's ``PowerNorm``. ``convert_sync_norms``
turns every batch-dependent norm into one that normalizes with the statistics of the *global* batch
(here ``nproc × --batch`` samples) in training, sharing the parameters and buffers it had; DDP then
averages the gradients. gloo on CPU, NCCL when every rank has a GPU. Eval never communicates, so
rank 0 evaluates alone. At the end the running statistics are checked to be identical on all ranks.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import normkit as nk
from normkit.data import load_digits
from normkit.distributed import convert_sync_norms


class Net(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.token_norm = nk.PowerNorm(width, warmup_iters=50)  # over (batch, tokens), per channel
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (B, C, 4, 4)
        tokens = f.flatten(2).transpose(1, 2)  # (B, 16, C)
        return self.head(self.token_norm(tokens).mean(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="samples per rank and step (the micro-batch)")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)

    data = load_digits()
    model = convert_sync_norms(Net()).to(device)  # BatchNorm2d -> synced normkit BatchNorm2d, PowerNorm synced
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    n, glob = len(data.y_train), args.batch * world
    start = time.perf_counter()
    for epoch in range(args.epochs):
        ddp.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))  # same order on every rank
        total = 0.0
        for step in range(n // glob):
            idx = perm[step * glob + rank * args.batch: step * glob + (rank + 1) * args.batch]  # this rank's slice
            x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if rank == 0:
            model.eval()  # eval uses the running statistics: no communication, rank 0 alone
            with torch.no_grad():
                acc = (model(data.x_test.to(device)).argmax(1).cpu() == data.y_test).float().mean().item()
            print(f"epoch {epoch + 1}: mean loss {total / (n // glob):.3f}, test accuracy {acc:.3f} "
                  f"({world} ranks x {args.batch} = global batch {glob}, {time.perf_counter() - start:.1f}s)", flush=True)
        dist.barrier()
    # synchronized statistics keep every rank's running buffers identical: check it
    flat = torch.cat([b.double().reshape(-1) for b in model.buffers() if b.is_floating_point()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    low = flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"largest difference of the running statistics between ranks: {(spread - low).abs().max().item():.3g}",
              flush=True)
    del ddp  # DDP holds the group's reducer; release it before the group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
