"""``python -m normkit.optim.measure``: what normkit.optim costs and finds on a CIFAR-sized ResNet-18.

Prints (1) which weights :func:`~normkit.optim.find_scale_invariant` finds, how long the rule and
the numeric check take, and whether AdamP's own cosine test (on one real gradient) agrees; (2) the
time of one optimizer step over all ResNet-18 parameters for each optimizer next to torch's
AdamW / SGD (single-tensor loops, the same on both sides; median of ``--reps`` steps, timed round robin).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from normkit.models.resnet import resnet
from normkit.optim.adamp import AdamP
from normkit.optim.agc import AGC, nfnet_param_groups
from normkit.optim.lamb import LAMB
from normkit.optim.lars import LARS
from normkit.optim.novograd import NovoGrad
from normkit.optim.projection import project_radial_
from normkit.optim.scale_invariant import find_scale_invariant
from normkit.optim.sgdp import SGDP
from normkit.optim.sinkgd import SinkGD


def _step_ms(makers: dict[str, Callable[[], torch.optim.Optimizer]], reps: int) -> dict[str, float]:
    """Median ms per step of each optimizer, timed round robin (one step of each per repetition), so a
    change in machine load affects them alike; one untimed warm-up step each."""
    opts = {name: make() for name, make in makers.items()}
    for opt in opts.values():
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(reps):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = resnet(18, num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    matrices = [n for n, p in model.named_parameters() if p.dim() > 1]
    t = time.perf_counter()
    rule = find_scale_invariant(model, x, verify=False)
    t_rule = time.perf_counter() - t
    t = time.perf_counter()
    found = find_scale_invariant(model, x)
    t_checked = time.perf_counter() - t
    views = sorted(set(found.values()))
    print(f"ResNet-18 (10 classes), batch 8x3x32x32, {torch.get_num_threads()} thread(s)")
    print(f"find_scale_invariant: {len(found)}/{len(matrices)} matrices scale-invariant ({', '.join(views)} view); "
          f"rule {len(rule)} in {t_rule:.2f} s, with the numeric check {t_checked:.2f} s")
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    agree = 0
    for name, p in model.named_parameters():
        if p.dim() > 1:
            fired = project_radial_(p.detach(), p.grad, p.grad.clone(), delta=0.1, wd_ratio=0.5, eps=1e-8) == 0.5
            agree += fired == (name in found)
    print(f"AdamP's cosine test (delta=0.1) on one gradient agrees with the tracing on {agree}/{len(matrices)} matrices")
    params = list(model.parameters())
    convs = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.startswith("fc.")]
    others = [p for n, p in model.named_parameters() if p.dim() <= 1 or n.startswith("fc.")]
    for p in params:
        p.grad = torch.randn_like(p)
    rows = [
        ("torch AdamW", lambda: torch.optim.AdamW(params, lr=1e-3, foreach=False)),
        ("AdamP", lambda: AdamP(params, lr=1e-3, weight_decay=1e-4)),
        ("LAMB", lambda: LAMB(params, lr=1e-3)),
        ("NovoGrad", lambda: NovoGrad(params, lr=1e-2)),
        # SinkGD on every matrix but the classifier (the paper's split would leave a CNN's convolutions to AdamW)
        ("SinkGD", lambda: SinkGD([{"params": convs}, {"params": others, "algorithm": "adamw"}], lr=1e-3)),
        ("torch SGD", lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)),
        ("SGDP", lambda: SGDP(params, lr=0.1, momentum=0.9, weight_decay=1e-4)),
        ("LARS", lambda: LARS(params, lr=0.1)),
        ("AGC(SGD)", lambda: AGC(torch.optim.SGD(nfnet_param_groups(model), lr=0.1, momentum=0.9, foreach=False))),
    ]
    print(f"one step over {sum(p.numel() for p in params) / 1e6:.1f}M parameters (median of {args.reps}, round robin):")
    for name, ms in _step_ms(dict(rows), args.reps).items():
        print(f"  {name:12s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
