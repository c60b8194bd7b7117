"""Training and evaluation of one (job, seed) run.

Kept free of any printing: the runner owns progress and reporting, and a run that raises
is turned into an error row by the runner, not here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.bench.models import run_length
from normkit.bench.report import downsample
from normkit.bench.suites import Job
from normkit.data import DataSplit


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run is reproducible on the same machine/threads."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: leave them), restoring the count after."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def steps_per_epoch(job: Job, data: DataSplit) -> int:
    """Full batches in one pass over the training split (the last, partial batch is dropped).

    Dropping it keeps every step at the nominal batch size, which matters for batch-dependent
    norms: a trailing batch of 1 would give BatchNorm a different (degenerate) regime.
    """
    return max(1, len(data.x_train) // job.batch_size)


def total_steps(job: Job, data: DataSplit, scale: float = 1.0) -> int:
    """Optimizer steps of a run: ``epochs · scale`` passes, at least one step."""
    return max(1, round(job.epochs * scale * steps_per_epoch(job, data)))


def planned_steps(job: Job, scale: float = 1.0) -> int:
    """Optimizer steps the runner expects from ``job``: ``extra["steps"]`` for step-counted jobs
    (the language model, which streams batches rather than passing over a split), else
    :func:`total_steps` over the job's data."""
    if "steps" in job.extra:
        return max(1, round(int(job.extra["steps"]) * scale))
    return total_steps(job, job.data(), scale)


def _optimizer(model: nn.Module, job: Job) -> torch.optim.Optimizer:
    # Decay only weight matrices/kernels: decaying norm gains (or ScaleNorm's single scalar,
    # DyT's alpha) would pull them to zero and penalize some methods more than others.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": job.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one fused update over all tensors instead of a Python loop per tensor (the same
    # arithmetic, bitwise-equal results; ~0.25 ms less per step, which counts at batch 2).
    return torch.optim.AdamW(groups, lr=job.lr, foreach=True)


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup · steps`` then cosine decay to zero."""
    n_warm = int(warmup * steps)
    if step < n_warm:
        return (step + 1) / n_warm
    t = (step - n_warm) / max(1, steps - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: nn.Module, data: DataSplit, batch_size: int = 512) -> float:
    """Test accuracy in ``eval()`` mode (running statistics for BatchNorm)."""
    model.eval()
    correct = 0
    for i in range(0, len(data.x_test), batch_size):
        logits = model(data.x_test[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == data.y_test[i : i + batch_size]).sum())
    return correct / len(data.x_test)


def _train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    job: Job,
    steps: int,
    batch_loss: Callable[[int], Tensor],
    on_step: Callable[[int], None] | None,
    *,
    clip: float | None = None,
) -> tuple[list[float], str, str, float, float, float]:
    """``steps`` optimizer steps on ``batch_loss(step)`` with the job's warm-up schedule.

    Stops at a non-finite loss (status ``"diverged"``, the progress bar advanced to the end).
    Returns ``(losses, status, error, t0, t_first, t1)``: start, end of the first step, end.
    """
    losses: list[float] = []
    status, error = "ok", ""
    model.train()
    t0 = t_first = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = job.lr * _lr_factor(step, steps, job.warmup)
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        value = loss.item()
        losses.append(value)
        if step == 0:
            t_first = time.perf_counter()
        if on_step is not None:
            on_step(1)
        if not math.isfinite(value):
            status, error = "diverged", f"non-finite loss at step {step + 1}/{steps}"
            if on_step is not None:
                on_step(steps - step - 1)
            break
    return losses, status, error, t0, t_first, time.perf_counter()


def train_run(
    job: Job,
    seed: int,
    *,
    scale: float = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``job`` with ``seed`` and return the measured fields of its result row.

    ``on_step(n)`` is called with the number of steps just completed (for progress bars).
    ``train_loss`` is the mean over the last 10% of steps: one step's loss at batch 2 is
    too noisy to compare. ``ms_per_step`` excludes the first step (lazy initialization).
    A non-finite loss stops training and sets ``status="diverged"``.
    """
    data = job.data()
    steps = total_steps(job, data, scale)
    seed_everything(seed)
    with run_length(steps, int(job.warmup * steps)):  # norms' schedules as fractions of this run
        model = job.build(job.norm)
    params = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, job)
    spe = steps_per_epoch(job, data)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.x_train), generator=gen)

    def batch_loss(step: int) -> Tensor:
        nonlocal perm
        i = step % spe
        if i == 0 and step:
            perm = torch.randperm(len(data.x_train), generator=gen)
        idx = perm[i * job.batch_size : (i + 1) * job.batch_size]
        return F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])

    losses, status, error, t0, t_first, t1 = _train_loop(model, opt, job, steps, batch_loss, on_step)
    done = len(losses)
    ms = (t1 - t_first) / (done - 1) * 1e3 if done > 1 else (t1 - t0) * 1e3
    tail = losses[-max(1, done // 10) :]
    test_acc = evaluate(model, data)
    measured = dict(job.measure(model, data)) if job.measure is not None else {}
    return {
        **measured,
        "steps": done,
        "epochs_done": done / spe,
        "test_acc": test_acc,
        "train_loss": float(np.mean(tail)),
        "loss_curve": downsample(losses),
        "ms_per_step": ms,
        "train_time_s": t1 - t0,
        "params": params,
        "status": status,
        "error": error,
    }


# --------------------------------------------------------------------------- language model

#: The LM task's batches (``normkit.data.text.padded_batches``): lengths uniform in [MIN, MAX] bytes.
LM_MIN_LEN, LM_MAX_LEN = 8, 64
LM_VAL_BATCHES, LM_VAL_SEED = 24, 10_000


@torch.no_grad()
def evaluate_lm(model: nn.Module, corpus: Any, batch_size: int, num_batches: int = LM_VAL_BATCHES) -> tuple[float, float]:
    """``(bits per byte, next-byte accuracy)`` over real tokens of fixed padded val batches (eval mode)."""
    from normkit.data.text import padded_batches

    model.eval()
    nats, correct, count = 0.0, 0, 0
    val = padded_batches(corpus, batch_size, LM_MIN_LEN, LM_MAX_LEN, num_batches=num_batches, seed=LM_VAL_SEED, split="val")
    for b in val:
        logits = model(b.inputs, b.mask)
        keep = b.mask
        nats += float(F.cross_entropy(logits[keep], b.targets[keep], reduction="sum"))
        correct += int((logits[keep].argmax(-1) == b.targets[keep]).sum())
        count += int(keep.sum())
    return nats / count / math.log(2), correct / count


def train_lm_run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``Job.run`` hook of the byte-level LM: ``extra["steps"]`` AdamW steps on padded batches of the stdlib corpus.

    Same seed, same batches and same initial weights for every norm (paired). ``test_loss`` is the
    val loss in bits per byte (lower is better), ``test_acc`` the next-byte accuracy; ``train_loss``
    the mean training loss (nats/byte) over the last 10% of steps.
    """
    from normkit.data.text import load_text, padded_batches

    corpus = load_text()
    steps = planned_steps(job, scale)
    seed_everything(seed)
    with run_length(steps, int(job.warmup * steps)):  # norms' schedules as fractions of this run
        model = job.build(job.norm)
    params = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, job)
    batches = iter(padded_batches(corpus, job.batch_size, LM_MIN_LEN, LM_MAX_LEN, num_batches=steps, seed=seed))

    def batch_loss(step: int) -> Tensor:
        b = next(batches)
        logits = model(b.inputs, b.mask)
        return F.cross_entropy(logits.flatten(0, 1), b.targets.flatten())  # padded targets are ignored

    clip = float(job.extra["clip"]) if job.extra.get("clip") else None
    losses, status, error, t0, t_first, t1 = _train_loop(model, opt, job, steps, batch_loss, on_step, clip=clip)
    done = len(losses)
    val_batches = LM_VAL_BATCHES if scale >= 1 else max(2, round(LM_VAL_BATCHES * scale))  # smoke tests: a smaller val set
    bpb, acc = evaluate_lm(model, corpus, job.batch_size, val_batches) if status == "ok" else (float("nan"), 0.0)
    return {
        "steps": done,
        "epochs_done": 0.0,
        "test_acc": acc,
        "test_loss": bpb,
        "train_loss": float(np.mean(losses[-max(1, done // 10) :])),
        "loss_curve": downsample(losses),
        "ms_per_step": (t1 - t_first) / (done - 1) * 1e3 if done > 1 else (t1 - t0) * 1e3,
        "train_time_s": t1 - t0,
        "params": params,
        "status": status,
        "error": error,
    }
