"""Bench suite ``continual``: BN vs AdaB²N on Split-Digits, online class-incremental with replay.

Lyu et al. 2023 (AdaB²N, arXiv:2310.08855) report up to +7.68 pt final average accuracy over
BN on online Split CIFAR-10 with ER-ACE/DER++ (reduced ResNet-18, batch 10). Here: the bench's
small CNN on Split-Digits (5 tasks × 2 classes of scikit-learn digits), one pass, batch 10 +
10 replayed from a 100-example reservoir buffer, SGD lr 0.1, class-incremental evaluation;
two replay losses: ER-ACE (the official AdaB²N loop) and plain ER.

Each job runs ``REPLICATES`` seeds internally (paired: BN and AdaB²N see the same initial
weights, stream order and buffer draws), so one invocation gives a paired comparison in under a
minute (single-threaded, see :func:`_run`); ``--full`` keeps the 20 replicates (``--seeds 3`` triples them).

AdaB²N hyperparameters (κ = 1.0, λ = 1.0, ada_t0 = 1) were chosen from the official grid
(κ ∈ {0.1, 0.4, 0.7, 1.0}, λ ∈ {0.01, 0.1, 1, 10}, ada_t0 ∈ {0, 1}) on a validation split carved
out of the training set (seeds 100–229), never on the test set.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from normkit.bench.models import SmallCNN
from normkit.bench.suites import Job, SuiteConfig, pct, register_suite
from normkit.bench.train import seed_everything, torch_threads
from normkit.bench.verdict import advantage, format_claim, per_seed, seed_mean

#: Paired seeds per job and invocation (runner seed s uses s·REPLICATES … s·REPLICATES + REPLICATES − 1).
REPLICATES = 20
#: The setting of every job; copied into each result row.
SETTING: dict[str, Any] = {
    "num_tasks": 5,
    "classes_per_task": 2,
    "batch_size": 10,
    "replay_batch_size": 10,
    "buffer_size": 100,
    "lr": 0.1,
    "kappa": 1.0,
    "lambd": 1.0,
    "ada_t0": 1,
}
STRATEGIES = ("er_ace", "er")


def _build(norm: str) -> nn.Module:
    model = SmallCNN("batchnorm")
    if norm == "adab2n":
        from normkit.nn.adab2n import convert_adab2n

        model = convert_adab2n(model, SETTING["num_tasks"], SETTING["classes_per_task"], SETTING["kappa"])
    return model


def _run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``Job.run`` hook: REPLICATES paired online runs; ``test_acc`` is their mean final average accuracy.

    ``scale`` < 1 trains on that fraction of each task's stream and runs fewer replicates (smoke
    tests); ``scale`` > 1 makes several passes over each task (no longer online).

    Runs on one torch thread whatever ``--threads`` says: the CNN on 8×8 images at batch 20 has
    nothing to parallelize (2 threads were 14× slower on a loaded 2-core machine), and the numbers
    then do not depend on the thread count (reduction order changes the training trajectory).
    """
    with torch_threads(1):
        return _run_replicates(job, seed, scale, on_step)


def _run_replicates(job: Job, seed: int, scale: float, on_step: Callable[[int], None] | None) -> dict[str, Any]:
    from normkit.continual.split_digits import load_split_digits, train_online

    ex: Mapping[str, Any] = job.extra
    tasks = load_split_digits(ex["num_tasks"], ex["classes_per_task"])
    replicates = max(1, min(REPLICATES, round(REPLICATES * scale))) if scale < 1 else REPLICATES
    fraction, passes = (scale, 1) if scale < 1 else (1.0, max(1, round(scale)))
    runs = []
    params = 0
    for k in range(replicates):
        s = seed * REPLICATES + k
        seed_everything(s)
        model = job.build(job.norm)
        params = sum(p.numel() for p in model.parameters())
        runs.append(
            train_online(
                model, tasks, batch_size=job.batch_size, replay_batch_size=ex["replay_batch_size"],
                buffer_size=ex["buffer_size"], lr=job.lr, strategy=ex["strategy"], lambd=ex["lambd"],
                ada_t0=ex["ada_t0"], passes=passes, stream_fraction=fraction, seed=s, on_step=on_step,
            )
        )  # fmt: skip
    steps = sum(r.steps for r in runs)
    per_task = [statistics.fmean(r.final_accs[j] for r in runs) for j in range(len(tasks))]
    return {
        "steps": steps,
        "epochs_done": passes * fraction * len(runs),
        "test_acc": statistics.fmean(r.avg_acc for r in runs),
        "train_loss": statistics.fmean(r.train_loss for r in runs),
        "ms_per_step": statistics.fmean(r.ms_per_step for r in runs),
        "train_time_s": sum(r.train_time_s for r in runs),
        "params": params,
        "status": "ok",
        "error": "",
        "replicate_seeds": [seed * REPLICATES + k for k in range(replicates)],
        "acc_replicates": [r.avg_acc for r in runs],
        "per_task_acc": per_task,
        "forgetting": statistics.fmean(r.forgetting for r in runs),
    }


def _continual_claims(results: list[dict[str, Any]]) -> list[str]:
    """Lyu et al. 2023: AdaB²N beats BN in final average accuracy (online class-incremental with replay).

    Paired over the jobs' internal replicate seeds (BN and AdaB²N see the same initial weights,
    stream order and buffer draws for each).
    """
    lines = []
    for strategy in STRATEGIES:
        bn, ada = {"norm": "batchnorm", "strategy": strategy}, {"norm": "adab2n", "strategy": strategy}
        if not per_seed(results, **bn) or not per_seed(results, **ada):
            continue
        name = "ER-ACE" if strategy == "er_ace" else "ER"
        claim = "AdaB2N > BN in final average accuracy (online class-incremental with replay)"
        paper = "online Split CIFAR-10/100, Mini-ImageNet, ER-ACE/DER++, reduced ResNet-18, batch 10: up to +7.7 pt"
        if strategy == "er":
            paper = "not a protocol of the paper (plain ER)"
        lines.append(format_claim(
            "Lyu et al. 2023 (AdaB2N, arXiv:2310.08855)",
            claim,
            advantage(results, ada, bn),
            paper=paper,
            ours=f"Split-Digits 5×2, {name}, buffer {SETTING['buffer_size']}: BN {pct(seed_mean(results, **bn))} vs AdaB2N "
            f"{pct(seed_mean(results, **ada))}",
        ))  # fmt: skip
    return lines


@register_suite(
    "continual",
    description="Split-Digits online class-incremental (5×2 classes), replay buffer 100: BN vs AdaB2N, ER-ACE and ER (~1 min)",
    claims=_continual_claims,
    seeds=1,  # each job runs REPLICATES paired seeds itself
    full_seeds=1,  # --full: the same 20 paired replicates (the full bench's 30-minute budget)
    scope="Split CIFAR/Mini-ImageNet with a reduced ResNet-18: ours is Split-Digits with a 3-layer CNN.",
)
def continual(cfg: SuiteConfig) -> list[Job]:
    """BN vs AdaB²N in the small CNN, with ER-ACE and with plain ER (REPLICATES paired seeds per job)."""
    return [
        Job(
            "split-digits",
            f"cnn+{strategy}",
            norm,
            _build,
            SETTING["batch_size"],
            REPLICATES,
            SETTING["lr"],
            extra={**SETTING, "strategy": strategy},
            run=_run,
        )  # fmt: skip
        for strategy in STRATEGIES
        for norm in ("batchnorm", "adab2n")
    ]
