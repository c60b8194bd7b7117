"""The layers and checks the multi-process tests run (imported by the spawned workers).

Every case builds a batch-dependent layer twice — a reference (``process_group=None``) that sees the
whole global batch in one process, and a synchronized copy (``process_group="world"``, same state) that
sees only this rank's slice — runs a few training steps and records the largest differences of the
forward output, the input gradient, the parameter gradients summed over ranks (DDP's average is this
sum over the world size, for a loss that is the per-rank sum) and every buffer after each step. The
reference is the plain single-process layer: nothing in it communicates.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DT = torch.float64
#: per-rank batch sizes by world size: equal, uneven, one rank with zero samples
SPLITS = {2: {"equal": [4, 4], "uneven": [3, 6], "zero": [0, 7]}, 3: {"equal": [3, 3, 3], "uneven": [2, 5, 3], "zero": [4, 0, 3]}}
STEPS = 3
#: a large common offset (x = 1e6 + noise): sums about 0 lose ~12 of float64's 16 digits to cancellation
OFFSET = 1e6


def _img(n: int, g: torch.Generator, c: int = 4) -> dict[str, Tensor]:
    return {"x": torch.randn(n, c, 3, 3, generator=g, dtype=DT) * 2 + 1.5}


def _img_mask(n: int, g: torch.Generator) -> dict[str, Tensor]:
    d = _img(n, g)
    d["mask"] = torch.rand(n, 1, 3, 3, generator=g) > 0.3
    return d


def _tokens(n: int, g: torch.Generator, pad: str | None = None, pad_true: bool = True) -> dict[str, Tensor]:
    d = {"x": torch.randn(n, 5, 6, generator=g, dtype=DT) + 0.5}
    if pad:
        keep = torch.rand(n, 5, generator=g) > 0.3
        d[pad] = ~keep if pad_true else keep.unsqueeze(-1)
    return d


def _loan(n: int, g: torch.Generator) -> dict[str, Tensor]:
    return {"x": torch.randn(n, 4, 3, 3, generator=g, dtype=DT), "cond": torch.randn(n, 3, 3, 3, generator=g, dtype=DT)}


def _gdwct(n: int, g: torch.Generator) -> dict[str, Tensor]:
    return {"x": torch.randn(n, 4, 3, 3, generator=g, dtype=DT) * 2 + 1.5, "style": torch.randn(n, 4, generator=g, dtype=DT)}


def _adab2n(pg: Any, tasks_done: int) -> nn.Module:
    """AdaB2N (kappa 0.4: the η recursion) after ``tasks_done`` finished tasks (its balanced statistics from 1)."""
    from normkit.nn.adab2n import AdaB2N

    m = AdaB2N(4, 3, 1, kappa=0.4, process_group=pg, dtype=DT)
    for _ in range(tasks_done):
        m.end_task()
    return m


def cases() -> list[tuple[str, Callable[[Any], nn.Module], Callable[[int, torch.Generator], dict[str, Tensor]]]]:
    """(name, build(process_group), inputs(n, generator)); inputs' tensors all have the batch at dim 0."""
    import normkit as nk
    from normkit.nn.batch_channel_norm import EstBN

    return [
        ("BatchNorm2d", lambda pg: nk.BatchNorm2d(4, process_group=pg, dtype=DT), _img),
        ("BatchNorm2d+mask", lambda pg: nk.BatchNorm2d(4, process_group=pg, dtype=DT), _img_mask),
        ("BatchNorm(momentum=None)", lambda pg: nk.BatchNorm(4, momentum=None, process_group=pg, dtype=DT), _img),
        ("BatchNorm1d(N,C)", lambda pg: nk.BatchNorm1d(6, process_group=pg, dtype=DT),
         lambda n, g: {"x": torch.randn(n, 6, generator=g, dtype=DT) * 3 - 2}),
        ("BatchRenorm", lambda pg: nk.BatchRenorm(4, momentum=0.3, schedule=False, r_max=1.2, d_max=0.2,
                                                  process_group=pg, dtype=DT), _img_mask),
        ("EvoNormB0", lambda pg: nk.EvoNormB0(4, process_group=pg, dtype=DT), _img),
        ("IBN", lambda pg: nk.IBN(4, process_group=pg, dtype=DT), _img),
        ("PowerNorm", lambda pg: nk.PowerNorm(6, warmup_iters=2, process_group=pg, dtype=DT),
         lambda n, g: _tokens(n, g, "pad_mask")),
        ("UnifiedNorm", lambda pg: nk.UnifiedNorm(6, window_size=2, warmup_iters=1, compensation_iters=1,
                                                  process_group=pg, dtype=DT),
         lambda n, g: _tokens(n, g, "pad_mask")),
        ("RepBN+mask", lambda pg: nk.RepBN(6, process_group=pg, dtype=DT), lambda n, g: _tokens(n, g, "mask", False)),
        ("PRepBN", lambda pg: nk.PRepBN(6, warm=1, total_step=4, process_group=pg, dtype=DT), _tokens),
        ("BatchChannelNorm", lambda pg: nk.BatchChannelNorm(4, 2, process_group=pg, dtype=DT), _img),
        ("EstBN", lambda pg: EstBN(4, process_group=pg, dtype=DT), _img),
        ("AdaB2N", lambda pg: _adab2n(pg, tasks_done=0), _img),
        ("AdaB2N+task_ids", lambda pg: _adab2n(pg, tasks_done=2),
         lambda n, g: {**_img(n, g), "task_ids": torch.randint(0, 3, (n,), generator=g)}),
        ("LOAN", lambda pg: nk.LOAN(4, 3, process_group=pg, dtype=DT), _loan),
        ("RegionNormB", lambda pg: nk.RegionNormB(4, process_group=pg, dtype=DT),
         lambda n, g: {**_img(n, g), "mask": (torch.rand(n, 1, 3, 3, generator=g) > 0.5).to(DT)}),
        ("RegionNormL", lambda pg: nk.RegionNormL(4, process_group=pg, dtype=DT), _img),
        ("GDWCT", lambda pg: nk.GDWCT(4, num_groups=2, mlp_dim=8, process_group=pg, dtype=DT), _gdwct),
        ("GDWCT+exact+losses", lambda pg: _WithLosses(nk.GDWCT(4, num_groups=2, mlp_dim=8, exact_whitening=True,
                                                               process_group=pg, dtype=DT)), _gdwct),
    ]


class _WithLosses(nn.Module):
    """GDWCT returning ``y + whitening_loss``: the synchronized covariance (ZCA whitening and its regulariser)
    in the forward output and in every gradient. (The coloring loss is a mean over this rank's samples'
    style matrices, per process by design: DDP averages it.)"""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        y, w_loss, _ = self.m(x, style, return_losses=True)
        return y + w_loss


def offset(inputs: Callable[[int, torch.Generator], dict[str, Tensor]]) -> Callable[[int, torch.Generator], dict[str, Tensor]]:
    """The same inputs moved by :data:`OFFSET` (the normalized features ``x`` and LOAN's condition map)."""

    def moved(n: int, g: torch.Generator) -> dict[str, Tensor]:
        d = inputs(n, g)
        return {k: v + OFFSET if k in ("x", "cond") else v for k, v in d.items()}

    return moved


def _perturb(m: nn.Module, seed: int) -> None:
    """Non-trivial parameters and buffers (away from their inits) so every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        for name, b in m.named_buffers():
            if b.is_floating_point() and "running_var" in name:
                b.mul_(1 + 0.2 * torch.rand(b.shape, generator=g, dtype=b.dtype))


def _err(a: Tensor | None, b: Tensor | None, relative: bool = False) -> float:
    """Largest absolute difference; ``relative``: divided by ``max(1, max|b|)`` (values near the offset)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    err = (a.double() - b.double()).abs().max().item()
    return err / max(1.0, b.double().abs().max().item()) if relative else err


def check_case(name: str, build: Callable, inputs: Callable, sizes: list[int], rank: int, seed: int,
               relative: bool = False, steps: int = STEPS) -> dict[str, float]:
    torch.manual_seed(seed)  # the same initial layer on every rank (its init draws from the global generator)
    ref = build(None).train()
    _perturb(ref, seed)
    syn = build("world").train()
    syn.load_state_dict(ref.state_dict())
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    errs = {"forward": 0.0, "input_grad": 0.0, "param_grad": 0.0, "buffers": 0.0}
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 100 + step)
        full = inputs(sum(sizes), g)
        xr = full["x"].clone().requires_grad_()
        xs = full["x"][lo:hi].clone().requires_grad_()
        rest_r = {k: v for k, v in full.items() if k != "x"}
        rest_s = {k: v[lo:hi] for k, v in rest_r.items()}
        yr, ys = ref(xr, **rest_r), syn(xs, **rest_s)
        up = torch.randn(yr.shape, generator=g, dtype=DT)
        ref.zero_grad()
        syn.zero_grad()
        (yr * up).sum().backward()
        (ys * up[lo:hi]).sum().backward()
        errs["forward"] = max(errs["forward"], _err(ys, yr[lo:hi], relative))
        errs["input_grad"] = max(errs["input_grad"], _err(xs.grad, xr.grad[lo:hi], relative))
        for pr, ps in zip(ref.parameters(), syn.parameters()):
            gs = torch.zeros_like(ps) if ps.grad is None else ps.grad.clone()
            dist.all_reduce(gs)
            gr = torch.zeros_like(pr) if pr.grad is None else pr.grad
            errs["param_grad"] = max(errs["param_grad"], _err(gs, gr, relative))
        for br, bs in zip(ref.buffers(), syn.buffers()):
            errs["buffers"] = max(errs["buffers"], _err(bs, br, relative))
    return errs


def check_eval_is_local(rank: int) -> dict[str, float]:
    """Eval never communicates: ranks call eval a different number of times, nothing is issued, no hang."""
    import normkit as nk
    from normkit.sync import collective_calls

    layers = [nk.BatchNorm2d(4, process_group="world", dtype=DT), nk.PowerNorm(4, process_group="world", dtype=DT)]
    before = collective_calls()
    for m in layers:
        m.eval()
        for _ in range(rank + 1):  # rank r calls r + 1 times
            m(torch.randn(2, 4, 3, 3, dtype=DT) if isinstance(m, nk.BatchNorm) else torch.randn(2, 3, 4, dtype=DT))
    evals = collective_calls() - before
    one = torch.ones(1)
    dist.all_reduce(one)  # would fail or hang if any rank had issued an unmatched collective
    # training: exactly one collective per BatchNorm forward call (after the first, which also computes the
    # exact global mean its shift starts from: normkit.stats.synced_sums)
    bn = layers[0].train()
    bn(torch.randn(3, 4, 3, 3, dtype=DT))
    before = collective_calls()
    bn(torch.randn(3, 4, 3, 3, dtype=DT))
    return {"eval_collectives": float(evals), "train_collectives_per_bn_call": float(collective_calls() - before),
            "world_sum": one.item()}


def check_ddp(rank: int, world: int, steps: int = 20) -> dict[str, float]:
    """A short DDP run with synchronized norms equals single-process training on the same global batches."""
    import normkit as nk
    from normkit.distributed import convert_sync_norms

    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nk.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5),
    ).to(DT)
    model = convert_sync_norms(copy.deepcopy(ref))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_s = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    sizes = [3 + r for r in range(world)]
    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(total, 3, 4, 4, generator=g, dtype=DT)
        t = torch.randint(0, 5, (total,), generator=g)
        opt_r.zero_grad()
        nn.functional.cross_entropy(ref(x), t, reduction="sum").div(total).backward()
        opt_r.step()
        opt_s.zero_grad()
        # DDP averages gradients over the world: scale the per-rank sum so the average is the global mean
        nn.functional.cross_entropy(ddp(x[lo:hi]), t[lo:hi], reduction="sum").mul(world / total).backward()
        opt_s.step()
    perr = max(_err(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    berr = max(_err(a, b) for a, b in zip(model.buffers(), ref.buffers()))
    return {"ddp_params": perr, "ddp_buffers": berr}


def check_tta(rank: int, sizes: list[int]) -> dict[str, float]:
    """TestTimeAdapter(process_group=...) adapts on the whole distributed test batch."""
    from normkit.adapt import TestTimeAdapter

    torch.manual_seed(0)  # float32: the adapters keep the source statistics in float32
    src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    with torch.no_grad():
        src[1].running_mean.uniform_(-1, 1)
        src[1].running_var.uniform_(0.5, 2)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    errs = {}
    for method in ("tbn", "alpha_bn", "ema_bn", "robust_bn"):
        ref, syn = TestTimeAdapter(src, method), TestTimeAdapter(src, method, process_group="world")
        local = TestTimeAdapter(src, method)  # this rank's slice alone: must differ (the sync is not a no-op)
        e, d = 0.0, 0.0
        for step in range(2):
            x = torch.randn(sum(sizes), 3, 6, 6, generator=torch.Generator().manual_seed(step)) + 0.3
            y = syn(x[lo:hi])
            e = max(e, _err(y, ref(x)[lo:hi]))
            d = max(d, _err(y, local(x[lo:hi])))
        e = max([e] + [_err(a, b) for a, b in zip(syn.buffers(), ref.buffers())])
        errs[f"tta/{method}"] = e
        errs[f"tta/{method}/vs_local"] = d
    return errs


def check_buffer_utils(rank: int, world: int) -> dict[str, float]:
    """average_norm_buffers: means averaged, variances by the law of total variance, counters from rank 0;
    broadcast_norm_buffers: rank 0's buffers everywhere (PowerNorm's window and counter included)."""
    import normkit as nk
    from normkit.distributed import average_norm_buffers, broadcast_norm_buffers

    def states(r: int) -> tuple[Tensor, Tensor, int]:
        g = torch.Generator().manual_seed(r)
        return torch.randn(3, generator=g, dtype=DT), torch.rand(3, generator=g, dtype=DT) + 0.5, 10 + r

    model = nn.Sequential(nn.BatchNorm1d(3).to(DT), nk.PowerNorm(3, dtype=DT))
    mean, var, steps = states(rank)
    with torch.no_grad():
        model[0].running_mean.copy_(mean)
        model[0].running_var.copy_(var)
        model[0].num_batches_tracked.fill_(steps)
        model[1].running_phi.fill_(float(rank + 1))
        model[1].iters.fill_(steps)
    average_norm_buffers(model)
    all_states = [states(r) for r in range(world)]
    means = torch.stack([m for m, _, _ in all_states])
    variances = torch.stack([v for _, v, _ in all_states])
    want_var = variances.mean(0) + means.square().mean(0) - means.mean(0).square()  # law of total variance
    out = {
        "avg/mean": _err(model[0].running_mean, means.mean(0)),
        "avg/var": _err(model[0].running_var, want_var),
        "avg/counter": float(model[0].num_batches_tracked.item() != 10),
        "avg/phi": _err(model[1].running_phi, torch.full((3,), (world + 1) / 2, dtype=DT)),
    }
    with torch.no_grad():
        model[0].running_mean.fill_(float(rank))
        model[1].iters.fill_(rank)
    broadcast_norm_buffers(model)
    out["bcast"] = max(_err(model[0].running_mean, torch.zeros(3, dtype=DT)), float(model[1].iters.item()))
    return out


def check_compile(rank: int, sizes: list[int]) -> dict[str, float]:
    """torch.compile(fullgraph=True) of a synchronized BatchNorm: no graph break, equal to eager."""
    import normkit as nk

    torch.manual_seed(0)
    eager = nk.BatchNorm2d(4, process_group="world", dtype=DT)
    comp_mod = copy.deepcopy(eager)
    collectives: list[int] = []  # all_reduce nodes per captured graph

    def counting(gm: torch.fx.GraphModule, example: list[Tensor]) -> Callable:
        # the autograd Function's forward and backward bodies (subgraph modules) included
        collectives.append(sum("all_reduce" in str(node.target) for sub in gm.modules()
                               if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example)

    comp = torch.compile(comp_mod, fullgraph=True, backend=counting)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    errs = {"compile/forward": 0.0, "compile/input_grad": 0.0, "compile/buffers": 0.0}
    # two calls: the first (exact two-pass start of the shift) and the steady state (sums about the shift
    # kept from the first call, sync.ShiftMemory), both inside the compiled graph; at offset 1e6 (relative)
    for step in range(2):
        g = torch.Generator().manual_seed(7 + step)
        x = (torch.randn(sum(sizes), 4, 3, 3, generator=g, dtype=DT) + OFFSET)[lo:hi]
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), comp(xc)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for key, a, b in (("forward", yc, ye), ("input_grad", xc.grad, xe.grad),
                          ("buffers", comp_mod.running_var, eager.running_var)):
            errs["compile/" + key] = max(errs["compile/" + key], _err(a, b, relative=True))
    errs["compile/graphs"] = float(len(collectives))
    errs["compile/steady_collectives"] = float(collectives[-1])
    errs["compile/first_collectives"] = float(collectives[0])
    return errs


def worker_compile(rank: int, world: int, port: int, out_dir: str) -> None:
    """Only the torch.compile check (slow: a few seconds of compilation per process)."""
    os.environ["NORMKIT_TEST_DIST_COMPILE"] = "only"
    worker(rank, world, port, out_dir)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results: dict[str, float] = {}
    try:
        if os.environ.get("NORMKIT_TEST_DIST_COMPILE") == "only":
            results.update(check_compile(rank, SPLITS[world]["uneven"]))
            return
        for i, (name, build, inputs) in enumerate(cases()):
            for split, sizes in SPLITS[world].items():
                for k, v in check_case(name, build, inputs, sizes, rank, seed=i + 1).items():
                    results[f"{name}/{split}/{k}"] = v
            # no catastrophic cancellation: x = 1e6 + noise, errors relative to the values' scale; two steps:
            # a layer's first synchronized call and one about the shift it kept (normkit.stats.synced_sums)
            for k, v in check_case(name, build, offset(inputs), SPLITS[world]["uneven"], rank, seed=i + 1,
                                   relative=True, steps=2).items():
                results[f"{name}/offset/{k}"] = v
        results.update(check_eval_is_local(rank))
        results.update(check_ddp(rank, world))
        results.update(check_tta(rank, SPLITS[world]["uneven"]))
        results.update(check_buffer_utils(rank, world))
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
