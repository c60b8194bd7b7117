"""Bench suite ``optim``: optimizers and parametrizations for normalized networks, paired over seeds.

Five claims, each measured on a small model that trains in seconds on one CPU thread, and judged
with :func:`normkit.bench.verdict.paired_verdict` on per-seed differences (every method of a claim
sees the same seed: the same initial weights, data order and label draws):

1. **AdamP / SGDP** (Heo et al., ICLR 2021, arXiv:2006.08217): on a BN CNN (the bench's
   ``SmallCNN`` on 8×8 digits) they keep the scale-invariant conv weights' norms lower than
   AdamW / SGD with momentum at the same hyperparameters, and match or beat their test accuracy.
2. **NaP** (Lyle et al., NeurIPS 2024, arXiv:2407.01800): on random-label memorization with the
   labels redrawn every phase (a plasticity benchmark of the paper, here on digits images), an MLP
   with LayerNorm trained by Adam loses plasticity as its weight norms grow (falling effective lr),
   while NaP holds lr/‖W‖² constant and keeps fitting new labels.
3. **SinkGD** (Scetbon et al. 2025, arXiv:2502.06742): on the bench's tiny ViT it reaches Adam's
   accuracy while keeping optimizer state only for the non-matrix parameters.
4. **AGC** (Brock et al., ICML 2021, arXiv:2102.06171): an NF-ResNet (``normkit.models.nf_resnet``)
   trains with SGD+AGC at a learning rate where plain SGD diverges.
5. **BN without gradient explosion** (Meterez et al., ICLR 2024, arXiv:2310.02012): the orthogonal
   linear BN MLP keeps ``‖∂L/∂W_1‖`` bounded from depth 5 to 150 at batch = width, while the same
   MLP with Gaussian weights sees it grow (no training: gradients at initialization, as the paper).

Runs single-threaded (small models; the numbers then do not depend on the thread count). Each job
is one method of one claim; the runner repeats it over the suite's paired seeds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normkit.bench.suites import Job, SuiteConfig, register_suite
from normkit.bench.train import _lr_factor, evaluate, seed_everything, torch_threads
from normkit.bench.verdict import format_claim, paired_differences, paired_verdict, seed_mean
from normkit.data import DataSplit

TASK = "digits"
#: Seeds per job (paired across the methods of a claim); ``--full`` uses FULL_SEEDS.
SEEDS, FULL_SEEDS = 5, 5  # full: the default's length and seeds (the full bench's 30-minute budget)


# --------------------------------------------------------------------------- shared loop


def _train_classifier(
    model: nn.Module,
    opt: Any,
    data: DataSplit,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    on_step: Callable[[int], None] | None,
    schedule: bool = True,
) -> dict[str, Any]:
    """Minibatch cross-entropy training (cosine lr after 10% warm-up when ``schedule``); stops on a non-finite loss."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    per_epoch = max(1, n // batch_size)
    perm = torch.randperm(n, generator=gen)
    losses: list[float] = []
    status, error = "ok", ""
    model.train()
    groups = opt.param_groups
    base = [g["lr"] for g in groups]
    t0 = time.perf_counter()
    for step in range(steps):
        i = step % per_epoch
        if i == 0 and step:
            perm = torch.randperm(n, generator=gen)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        if schedule:
            for g, b in zip(groups, base):
                g["lr"] = b * _lr_factor(step, steps, 0.1)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        losses.append(value)
        if on_step is not None:
            on_step(1)
        if not math.isfinite(value) or value > 1e4:
            status, error = "diverged", f"loss {value:.3g} at step {step + 1}/{steps}"
            if on_step is not None:
                on_step(steps - step - 1)
            break
    elapsed = time.perf_counter() - t0
    acc = evaluate(model, data) if status == "ok" else 0.1
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": len(losses), "epochs_done": len(losses) / per_epoch, "test_acc": acc,
        "train_loss": statistics.fmean(tail), "ms_per_step": elapsed / max(1, len(losses)) * 1e3,
        "train_time_s": elapsed, "params": sum(p.numel() for p in model.parameters()),
        "status": "ok", "error": error, "diverged": status == "diverged",
    }  # fmt: skip


def _steps(epochs: float, batch_size: int, scale: float, data: DataSplit) -> int:
    return max(1, round(epochs * scale * max(1, len(data.x_train) // batch_size)))


# --------------------------------------------------------------------------- 1. AdamP / SGDP

PROJECTION_OPTIMIZERS = ("adamw", "adamp", "sgd", "sgdp")


def _make_projection_opt(name: str, params: Any, job: Job) -> torch.optim.Optimizer:
    from normkit.optim import SGDP, AdamP

    wd = job.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=job.lr, weight_decay=wd)
    if name == "adamp":
        return AdamP(params, lr=job.lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=job.lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return SGDP(params, lr=job.lr, momentum=0.9, nesterov=True, weight_decay=wd)


def _run_projection(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from normkit.bench.models import SmallCNN

    data = job.data()
    with torch_threads(1):
        seed_everything(seed)
        model = SmallCNN("batchnorm")
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]  # bias-free, each feeds a BN
        opt = _make_projection_opt(job.extra["optimizer"], model.parameters(), job)
        steps = _steps(job.epochs, job.batch_size, scale, data)
        row = _train_classifier(model, opt, data, steps=steps, batch_size=job.batch_size, seed=seed, lr=job.lr, on_step=on_step)
    row["weight_norm"] = statistics.fmean(float(w.detach().norm()) for w in convs)
    return row


# --------------------------------------------------------------------------- 2. NaP

NAP_SETTING: dict[str, Any] = {"samples": 256, "phases": 10, "steps_per_phase": 80, "width": 128, "batch_size": 64, "lr": 1e-3}


def _nap_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )  # fmt: skip


def _run_nap(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Random-label memorization, labels redrawn every phase; end-of-phase training accuracy per phase."""
    from normkit.optim.nap import NaP, nap_targets, normalize_and_project

    ex = job.extra
    data = job.data()
    phases = max(2, round(ex["phases"] * min(1.0, scale))) if scale < 1 else ex["phases"]
    per_phase = max(1, round(ex["steps_per_phase"] * (scale if scale < 1 else 1.0)))
    with torch_threads(1):
        seed_everything(seed)
        model = _nap_mlp(ex["width"])
        normalize_and_project(model)  # both arms normalized: the comparison is the projection alone
        opt: Any = torch.optim.Adam(model.parameters(), lr=ex["lr"])
        if job.norm == "nap":
            opt = NaP(opt, model)
        first = nap_targets(model)[0][0][0]  # the first hidden layer's weight
        gen = torch.Generator().manual_seed(seed)
        x = data.x_train[torch.randperm(len(data.x_train), generator=gen)[: ex["samples"]]]
        accs, elrs = [], []
        t0 = time.perf_counter()
        for _ in range(phases):
            y = torch.randint(0, 10, (len(x),), generator=gen)
            model.train()
            for _ in range(per_phase):
                idx = torch.randint(0, len(x), (ex["batch_size"],), generator=gen)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if on_step is not None:
                    on_step(1)
            model.eval()
            with torch.no_grad():
                accs.append(float((model(x).argmax(1) == y).float().mean()))
            elrs.append(ex["lr"] / float(first.detach().pow(2).sum()))
    k = max(1, phases // 3)
    return {
        "steps": phases * per_phase, "epochs_done": float(phases), "test_acc": statistics.fmean(accs[-k:]),
        "train_loss": loss.item(), "ms_per_step": (time.perf_counter() - t0) / (phases * per_phase) * 1e3,
        "train_time_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters()),
        "status": "ok", "error": "", "phase_acc": accs, "first_acc": statistics.fmean(accs[:k]),
        "last_acc": statistics.fmean(accs[-k:]), "elr_ratio": elrs[-1] / elrs[0],
    }  # fmt: skip


# --------------------------------------------------------------------------- 3. SinkGD


def _state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _run_sinkgd(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from normkit.bench.models import TinyViT
    from normkit.optim import SinkGD, sinkgd_param_groups

    data = job.data()
    with torch_threads(1):
        seed_everything(seed)
        model = TinyViT("layernorm")
        if job.norm == "sinkgd":
            groups = sinkgd_param_groups(model, adamw={"lr": job.extra["adam_lr"]})
            opt: torch.optim.Optimizer = SinkGD(groups, lr=job.lr)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=job.lr)
        steps = _steps(job.epochs, job.batch_size, scale, data)
        row = _train_classifier(model, opt, data, steps=steps, batch_size=job.batch_size, seed=seed, lr=job.lr, on_step=on_step)
    row["state_fraction"] = _state_numel(opt) / sum(p.numel() for p in model.parameters())
    return row


# --------------------------------------------------------------------------- 4. AGC


def _nf_resnet() -> nn.Module:
    from normkit.models.nf_resnet import NFResNet

    return NFResNet(10, depths=(1, 1), widths=(16, 32), stem_width=16, in_chans=1, small_input=True, stochdepth_rate=0.0)


def _run_agc(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    data = job.data()
    with torch_threads(1):
        seed_everything(seed)
        model = _nf_resnet()
        from normkit.optim.agc import AGC, nfnet_param_groups

        # the NFNets groups (weight decay 2e-5 off gains/biases) for both arms; plain SGD ignores "clipping"
        sgd = torch.optim.SGD(nfnet_param_groups(model, clipping=job.extra["clipping"]), lr=job.lr, momentum=0.9, nesterov=True)
        opt: Any = AGC(sgd) if job.norm == "sgd+agc" else sgd
        steps = _steps(job.epochs, job.batch_size, scale, data)
        return _train_classifier(model, opt, data, steps=steps, batch_size=job.batch_size, seed=seed, lr=job.lr, on_step=on_step)


# --------------------------------------------------------------------------- 5. BN MLP gradients

BNGRAD_DEPTHS = (5, 150)
BNGRAD_WIDTH = 32  # = the batch size, as the official check (n = d)
BNGRAD_TRAIN_STEPS = 40


def _run_bngrad(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """log ‖∂L/∂W_1‖ at initialization for the shallow and the deep network, then a short SGD run of the deep one."""
    from normkit.models.bn_mlp import bn_mlp
    from normkit.optim.diagnostics import grad_norms_by_layer

    data = job.data()
    width = BNGRAD_WIDTH
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=gen)[:width]
    x, y = data.x_train[idx], data.y_train[idx]
    logs, per_layer = {}, []
    t0 = time.perf_counter()
    with torch_threads(1):
        for depth in BNGRAD_DEPTHS:
            seed_everything(seed)
            model = bn_mlp(64, 10, depth=depth, width=width, init=job.extra["init"])
            F.cross_entropy(model(x), y).backward()
            grads = grad_norms_by_layer(model)
            logs[depth] = math.log(grads["4"])  # W_1: the second linear layer, as the official notebook
            per_layer = list(grads.values())
        # the deep network trained briefly (batch = width), for the leaderboard's accuracy
        opt = torch.optim.SGD(model.parameters(), lr=job.lr)
        steps = max(1, round(BNGRAD_TRAIN_STEPS * scale))
        row = _train_classifier(
            model, opt, data, steps=steps, batch_size=width, seed=seed, lr=job.lr, on_step=on_step, schedule=False
        )
    growth = logs[BNGRAD_DEPTHS[-1]] - logs[BNGRAD_DEPTHS[0]]
    row.update({
        "train_time_s": time.perf_counter() - t0, "log_grad_shallow": logs[BNGRAD_DEPTHS[0]],
        "log_grad_deep": logs[BNGRAD_DEPTHS[-1]], "log_grad_growth": growth, "layer_grad_norms": per_layer,
    })  # fmt: skip
    return row


# --------------------------------------------------------------------------- jobs


def _job(task: str, model: str, arm: str, batch: int, epochs: float, lr: float, run: Any, /, **extra: Any) -> Job:
    return Job(task, model, arm, lambda _: nn.Identity(), batch, epochs, lr, extra=extra, run=run)


def _optim_jobs(cfg: SuiteConfig) -> list[Job]:
    epochs_cnn, epochs_vit, epochs_nf = 4, 6, 3  # the same with --full (30-minute budget of the full bench)
    jobs = []
    for name in PROJECTION_OPTIMIZERS:
        lr = 1e-2 if name.startswith("adam") else 0.1
        job = _job(TASK, "cnn-bn", name, 64, epochs_cnn, lr, _run_projection, claim="projection", optimizer=name)
        jobs.append(replace(job, weight_decay=1e-4))
    nap = NAP_SETTING
    for arm in ("adam", "nap"):
        jobs.append(
            _job("random-labels", "mlp-ln", arm, nap["batch_size"], nap["phases"], nap["lr"], _run_nap, claim="nap", **nap)
        )
    for arm in ("adam", "sinkgd"):
        jobs.append(_job(TASK, "vit", arm, 64, epochs_vit, 3e-3, _run_sinkgd, claim="sinkgd", adam_lr=3e-3))
    for arm in ("sgd", "sgd+agc"):
        jobs.append(_job(TASK, "nf-resnet", arm, 64, epochs_nf, 1.0, _run_agc, claim="agc", clipping=0.04))
    for init in ("orthogonal", "normal"):
        jobs.append(_job(TASK, "bn-mlp", init, BNGRAD_WIDTH, 1, 0.01, _run_bngrad, claim="bngrad", init=init))
    return jobs


# --------------------------------------------------------------------------- claims


def _m(results: list[dict[str, Any]], metric: str, spec: str, **match: Any) -> str:
    """The seed mean of ``metric`` formatted with ``spec``; "n/a" without runs that have it."""
    value = seed_mean(results, metric, **match)
    return "n/a" if value is None else format(value, spec)


def _claim_projection(results: list[dict[str, Any]], new: str, old: str, label: str) -> str:
    a, b = {"claim": "projection", "norm": new}, {"claim": "projection", "norm": old}
    wn = paired_verdict(paired_differences(results, [a], [b], metric="weight_norm"), "less")
    acc = paired_verdict(paired_differences(results, [a], [b]), "greater")
    norms = f"{_m(results, 'weight_norm', '.2f', **b)} → {_m(results, 'weight_norm', '.2f', **a)}"
    accs = f"{_m(results, 'test_acc', '.1%', **b)} → {_m(results, 'test_acc', '.1%', **a)}"
    ours = f"SmallCNN+BN on digits, batch 64; mean conv-weight norm {norms}; accuracy {accs} (Δ {acc.interval()}: {acc.label})"
    claim = f"{label}: smaller norms of the scale-invariant weights, accuracy matched or better"
    return format_claim("Heo et al. 2021 (AdamP/SGDP)", claim, wn, paper=PAPERS["projection"], ours=ours, scale=1.0, unit="")


def _claim_nap(results: list[dict[str, Any]]) -> str:
    a, b = {"claim": "nap", "norm": "nap"}, {"claim": "nap", "norm": "adam"}
    v = paired_verdict(paired_differences(results, [a], [b], metric="last_acc"), "greater")

    def arc(m: Mapping[str, Any]) -> str:
        return f"{_m(results, 'first_acc', '.1%', **m)}→{_m(results, 'last_acc', '.1%', **m)}"

    elr = f"Adam {_m(results, 'elr_ratio', '.3g', **b)}, NaP {_m(results, 'elr_ratio', '.3g', **a)}"
    ours = (
        f"MLP+LN, 256 digits images, labels redrawn every {NAP_SETTING['steps_per_phase']} Adam steps × "
        f"{NAP_SETTING['phases']} phases; end-of-phase train acc, first→last third: Adam {arc(b)}, NaP {arc(a)}; "
        f"lr/‖W₁‖² last/first: {elr}"
    )
    claim = "NaP holds the effective lr and stays trainable under label resets where Adam's plasticity decays"
    return format_claim("Lyle et al. 2024 (NaP)", claim, v, paper=PAPERS["nap"], ours=ours)


def _claim_sinkgd(results: list[dict[str, Any]]) -> str:
    a, b = {"claim": "sinkgd", "norm": "sinkgd"}, {"claim": "sinkgd", "norm": "adam"}
    v = paired_verdict(paired_differences(results, [a], [b]), "equivalent", margin=0.02)
    state = f"Adam {_m(results, 'state_fraction', '.2f', **b)}, SinkGD {_m(results, 'state_fraction', '.2f', **a)}"
    ours = (
        f"TinyViT on digits; Adam {_m(results, 'test_acc', '.1%', **b)} vs SinkGD {_m(results, 'test_acc', '.1%', **a)}; "
        f"optimizer state / parameters: {state} (SinkGD keeps AdamW state for the non-Linear parameters)"
    )
    return format_claim("Scetbon et al. 2025 (SinkGD)", "SinkGD ≈ Adam (within 2 pt)", v, paper=PAPERS["sinkgd"], ours=ours)


def _claim_agc(results: list[dict[str, Any]]) -> str:
    a, b = {"claim": "agc", "norm": "sgd+agc"}, {"claim": "agc", "norm": "sgd"}
    v = paired_verdict(paired_differences(results, [a], [b]), "greater", margin=0.05)
    div = [bool(r.get("diverged")) for r in results if r.get("claim") == "agc" and r["norm"] == "sgd" and r["status"] == "ok"]
    ours = (
        f"NF-ResNet (2 stages, widths 16/32) on digits, SGD+Nesterov lr 1.0, batch 64: plain SGD diverged in "
        f"{sum(div)}/{len(div)} seeds ({_m(results, 'test_acc', '.1%', **b)}), "
        f"SGD+AGC (λ = 0.04) {_m(results, 'test_acc', '.1%', **a)}"
    )
    claim = "AGC trains an NF-ResNet at a learning rate where SGD diverges (≥ 5 pt better)"
    return format_claim("Brock et al. 2021 (AGC)", claim, v, paper=PAPERS["agc"], ours=ours)


def _claim_bngrad(results: list[dict[str, Any]]) -> str:
    a, b = {"claim": "bngrad", "norm": "orthogonal"}, {"claim": "bngrad", "norm": "normal"}
    v = paired_verdict(paired_differences(results, [b], [a], metric="log_grad_growth"), "greater", margin=0.5)

    def arc(m: Mapping[str, Any]) -> str:
        return f"{_m(results, 'log_grad_shallow', '+.2f', **m)}→{_m(results, 'log_grad_deep', '+.2f', **m)}"

    d0, d1 = BNGRAD_DEPTHS
    ours = (
        f"linear BN MLP, width = batch = {BNGRAD_WIDTH}, digits inputs; log‖∂L/∂W₁‖ from depth {d0} to {d1}: "
        f"orthogonal {arc(a)}, Gaussian {arc(b)}; depth {d1} after {BNGRAD_TRAIN_STEPS} SGD steps: orthogonal "
        f"{_m(results, 'test_acc', '.1%', **a)}, Gaussian {_m(results, 'test_acc', '.1%', **b)} test acc"
    )
    claim = "orthogonal weights keep BN-MLP gradients bounded in depth, Gaussian weights' grow (log-growth gap > 0.5)"
    return format_claim("Meterez et al. 2024", claim, v, paper=PAPERS["bngrad"], ours=ours, scale=1.0, unit="")


#: The papers' settings, quoted beside ours in the claim lines.
PAPERS = {
    "projection": "ImageNet ResNets, same hyperparameters as AdamW/SGD",
    "nap": "CIFAR-10/MNIST random-label memorization with periodic resets; Atari",
    "sinkgd": "LLaMA 60M-1B pre-training on C4",
    "agc": "NFNets on ImageNet, batch 4096",
    "bngrad": "CIFAR-10 inputs, width = batch = 100, depth up to 1000",
}


def _optim_claims(results: list[dict[str, Any]]) -> list[str]:
    """One line per claim whose two arms both have successful runs (see the module doc)."""
    has = {(r.get("claim"), r["norm"]) for r in results if r.get("status") == "ok"}

    def both(claim: str, x: str, y: str) -> bool:
        return (claim, x) in has and (claim, y) in has

    lines = []
    for new, old, label in (("adamp", "adamw", "AdamP vs AdamW"), ("sgdp", "sgd", "SGDP vs SGD+momentum")):
        if both("projection", new, old):
            lines.append(_claim_projection(results, new, old, label))
    if both("nap", "nap", "adam"):
        lines.append(_claim_nap(results))
    if both("sinkgd", "sinkgd", "adam"):
        lines.append(_claim_sinkgd(results))
    if both("agc", "sgd+agc", "sgd"):
        lines.append(_claim_agc(results))
    if both("bngrad", "orthogonal", "normal"):
        lines.append(_claim_bngrad(results))
    return lines


def _optim_plots(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """``optim_bngrad_layers.png``: per-layer ‖∂L/∂W‖ of the deep BN MLP at init (orthogonal vs Gaussian);
    ``optim_nap_phases.png``: end-of-phase training accuracy per label phase (Adam vs NaP). Means over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def mean_curve(rows: list[dict[str, Any]], field: str) -> list[float]:
        curves = [r[field] for r in rows if r.get(field)]
        n = min((len(c) for c in curves), default=0)
        return [statistics.fmean(c[i] for c in curves) for i in range(n)]

    written = []
    ok = [r for r in results if r.get("status") == "ok"]
    panels = (
        (
            "bngrad",
            ("orthogonal", "normal"),
            "layer_grad_norms",
            "optim_bngrad_layers.png",
            "linear layer",
            "‖∂L/∂W‖ at init",
            "log",
        ),
        ("nap", ("adam", "nap"), "phase_acc", "optim_nap_phases.png", "label phase", "end-of-phase train accuracy", "linear"),
    )
    for claim, arms, field, name, xlabel, ylabel, yscale in panels:
        curves = {arm: mean_curve([r for r in ok if r.get("claim") == claim and r["norm"] == arm], field) for arm in arms}
        if not all(curves.values()):
            continue
        fig = Figure(figsize=(5, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for arm, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), curve, label=arm)
        ax.set(xlabel=xlabel, ylabel=ylabel, yscale=yscale)
        ax.legend(fontsize=8)
        fig.savefig(out / name, dpi=120)
        written.append(out / name)
    return written


@register_suite(
    "optim",
    description="AdamP/SGDP, NaP, SinkGD, AGC, BN-gradient MLP; 5 paired seeds, 60 runs (627 s at load 10-15 on 2 cores)",
    claims=_optim_claims,
    plots=_optim_plots,
    seeds=SEEDS,
    full_seeds=FULL_SEEDS,
)
def optim(cfg: SuiteConfig) -> list[Job]:
    """Optimizers and parametrizations for normalized networks (see the module doc for the claims)."""
    return _optim_jobs(cfg)
