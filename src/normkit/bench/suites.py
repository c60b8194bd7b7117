"""Suite registry and the built-in ``quick`` suite.

A *suite* is a named function turning a :class:`SuiteConfig` into a list of :class:`Job`
(one model + norm + batch size + schedule each). The runner expands every job over the
seeds, trains, and hands all results to the suite's optional ``claims`` hook, which
returns one-line verdicts ("paper says X; we get Y; direction holds") shown after the
leaderboard. Adding a suite is a few lines::

    @register_suite("small-batch", description="BN vs GN at tiny batches", claims=my_claims)
    def small_batch(cfg: SuiteConfig) -> list[Job]:
        return digits_jobs(cfg, image_norms=["batchnorm", "groupnorm"], token_norms=[], batch_sizes=(1, 2))
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from normkit.bench.models import SmallCNN, TinyViT
from normkit.bench.verdict import (
    claim_line,  # noqa: F401  (re-exported for suites not yet migrated)
    format_claim,
    not_learned,
    paired_differences,
    paired_verdict,
    seed_mean,
)
from normkit.data import DataSplit, load_digits
from normkit.registry import Layout, list_norms, norm_info


@dataclass(frozen=True)
class SuiteConfig:
    """What a suite function may look at when deciding its jobs."""

    full: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Job:
    """One training configuration; the runner trains it once per seed.

    ``build(norm)`` returns a fresh model whose normalization layers are ``norm``; it is
    called *after* seeding, so every norm starts from the same initial weights of the
    layers they share and sees the same data order (a paired comparison).
    ``epochs`` may be fractional; the runner multiplies it by ``scale`` and trains
    ``max(1, round(epochs · scale · steps_per_epoch))`` steps (drop-last batches).
    Weight decay (AdamW) applies to matrices/kernels only, never to norm gains or biases.
    """

    task: str
    model: str
    norm: str
    build: Callable[[str], nn.Module]
    batch_size: int
    epochs: float
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps with linear warm-up before the cosine decay
    data: Callable[[], DataSplit] = load_digits
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form, copied into each result row
    #: ``measure(model, data) -> {field: value}`` after training; merged into the result row
    #: (e.g. per-layer activation statistics for a plot).
    measure: Callable[[nn.Module, DataSplit], Mapping[str, Any]] | None = None
    #: ``run(job, seed, *, scale, on_step) -> {field: value}`` replaces the generic training loop
    #: (:func:`normkit.bench.train.train_run`) for jobs that train or evaluate differently (continual
    #: learning, test-time adaptation). It must return the measured fields ``train_run`` returns
    #: (``test_acc``, ``status``, ``error``, ``steps``, ...); exceptions become error rows as usual.
    run: Callable[..., Mapping[str, Any]] | None = None

    @property
    def key(self) -> str:
        """Identifier of the configuration (the same for all its seeds)."""
        return f"{self.task}/{self.model}/{self.norm}/bs{self.batch_size}"


JobsFn = Callable[[SuiteConfig], Iterable[Job]]
ClaimsFn = Callable[[list[dict[str, Any]]], list[str]]
PlotsFn = Callable[[list[dict[str, Any]], Path], list[Path]]


@dataclass(frozen=True)
class Suite:
    """A registered suite: its job function, description and optional claims hook."""

    name: str
    jobs: JobsFn
    description: str = ""
    claims: ClaimsFn | None = None
    full_seeds: int = 3  # paired seeds per job with ``full=True``
    #: ``plots(results, out_dir) -> [paths written]``: suite-specific figures beside results.png.
    plots: PlotsFn | None = None
    #: paired seeds per job without ``--full`` (``--seeds`` overrides both): enough to decide the
    #: suite's claims within its time budget, or 1 where a job runs its own paired replicates.
    seeds: int = 2
    #: what the suite's claims cannot show at this scale (one sentence for the report).
    scope: str = ""
    #: at most this many parallel worker processes by default (None: one per core); 1 for suites whose
    #: claims are wall-clock timings, which concurrent runs on the same cores would disturb.
    max_workers: int | None = None


#: All registered suites by name.
SUITES: dict[str, Suite] = {}


def register_suite(
    name: str,
    *,
    description: str = "",
    claims: ClaimsFn | None = None,
    full_seeds: int = 3,
    replace: bool = False,
    plots: PlotsFn | None = None,
    seeds: int = 2,
    scope: str = "",
    max_workers: int | None = None,
) -> Callable[[JobsFn], JobsFn]:
    """Decorator registering ``fn(cfg) -> Iterable[Job]`` as suite ``name``.

    Registering an existing name is an error unless ``replace=True`` (a typo should not
    silently shadow a built-in suite).
    """

    def deco(fn: JobsFn) -> JobsFn:
        if name in SUITES and not replace:
            raise ValueError(f"suite {name!r} is already registered")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        SUITES[name] = Suite(name, fn, doc, claims, full_seeds, plots, seeds, scope, max_workers)
        return fn

    return deco


def get_suite(name: str) -> Suite:
    """The suite registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(SUITES))}") from None


def norms_with_layout(layout: Layout, names: Sequence[str] | None = None) -> list[str]:
    """Registered drop-in norms (or the given ``names``) whose input layout is ``layout``.

    Conditional layers and embedding modules (``drop_in=False``) are left out of the
    registry-wide default; named explicitly they are kept.
    """
    if names is None:
        names = [n for n in list_norms() if norm_info(n).drop_in]
    return [n for n in names if norm_info(n).layout == layout]


def digits_jobs(
    cfg: SuiteConfig,
    *,
    image_norms: Sequence[str] | None = None,
    token_norms: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (64, 2),
    epochs: tuple[float, float] | None = None,
) -> list[Job]:
    """CNN jobs for every image norm × batch size, and ViT jobs for every token norm.

    ``None`` means every registered norm of the matching layout. The CNN uses the same
    number of epochs at every batch size (so micro-batches take many more, smaller steps),
    with the learning rate scaled down for small batches, where Adam at the large-batch
    rate is unstable regardless of the norm. ``epochs`` = (CNN, ViT) epochs; default
    (8, 30), (16, 60) with ``full``.
    """
    epochs_cnn, epochs_vit = epochs if epochs is not None else (16, 60) if cfg.full else (8, 30)
    jobs = [
        Job("digits", "cnn", norm, SmallCNN, bs, epochs_cnn, 1e-2 if bs >= 32 else 1e-3)
        for bs in batch_sizes
        for norm in norms_with_layout("channels_first", image_norms)
    ]
    jobs += [
        Job("digits", "vit", norm, TinyViT, 64, epochs_vit, 1e-2, weight_decay=0.05)
        for norm in norms_with_layout("channels_last", token_norms)
    ]
    return jobs


def scenes_jobs(
    cfg: SuiteConfig,
    norms: Sequence[str],
    *,
    build: Callable[[str], nn.Module] | None = None,
    batch_sizes: Sequence[int] = (64, 2),
    epochs: float | None = None,
) -> list[Job]:
    """Scene-CNN jobs (:class:`normkit.bench.models_tasks.SceneCNN` on :func:`normkit.data.scenes.load_scenes`).

    Same number of epochs at every batch size (micro-batches take many more, smaller steps); Adam's
    learning rate is 3e-3 at batch ≥ 32 and 3e-4 below, for every norm. At batch 64 the rate is not
    what limits learning: BN reaches 46% at 1e-2, 58% at 3e-3 and 6e-3 after 3 epochs; GN 18% at
    1e-2, 36% at 6e-3 (seed 0, 2026-12-03).
    """
    from normkit.bench.models_tasks import SceneCNN
    from normkit.data.scenes import load_scenes

    if epochs is None:
        epochs = SCENES_EPOCHS_FULL if cfg.full else SCENES_EPOCHS
    return [
        Job("scenes", "cnn", norm, build or SceneCNN, bs, epochs, 3e-3 if bs >= 32 else 3e-4, data=load_scenes)
        for bs in batch_sizes
        for norm in norms
    ]


#: Training length of the scene CNN (epochs over 5000 images), shared by every suite on scenes. Three
#: epochs (234 steps at batch 64, 7500 at batch 2) is what the full bench's 30 minutes on 2 cores affords
#: the microbatch suite; BN at batch 64 reaches 58% (37% after two; seed 0, 2026-12-03).
SCENES_EPOCHS, SCENES_EPOCHS_FULL = 3, 3


def mnist1d_jobs(cfg: SuiteConfig, token_norms: Sequence[str], *, epochs: float | None = None) -> list[Job]:
    """MNIST-1D transformer jobs (40 positions as tokens) for each token norm, batch 64."""
    from normkit.bench.models_tasks import SeqTransformer
    from normkit.data.mnist1d import load_mnist1d

    if epochs is None:
        epochs = 40 if cfg.full else 20
    return [
        Job("mnist1d", "transformer", norm, SeqTransformer, 64, epochs, 3e-3, weight_decay=0.05, data=load_mnist1d)
        for norm in norms_with_layout("channels_last", token_norms)
    ]  # fmt: skip


def mean_acc(results: Iterable[Mapping[str, Any]], **match: Any) -> float | None:
    """Mean test accuracy of the successful runs whose fields equal ``match`` (None if none).

    Helper for claims hooks, e.g. ``mean_acc(results, model="cnn", norm="batchnorm", batch_size=2)``.
    """
    accs = [r["test_acc"] for r in results if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]
    return statistics.fmean(accs) if accs else None


QUICK_IMAGE_NORMS = ("batchnorm", "groupnorm")
QUICK_TOKEN_NORMS = ("layernorm", "rmsnorm", "dyt")


def _quick_claims(results: list[dict[str, Any]]) -> list[str]:
    """Group Normalization (Wu & He 2018, arXiv:1803.08494): BN degrades at small batches, GN much less.

    Two parts, both paired per seed: BN's accuracy drops from batch 64 to 2 (BN64 − BN2 > 0), and
    it drops more than GN's ((BN64 − BN2) − (GN64 − GN2) > 0). The first part is what the old check
    missed: BN *improving* less than GN is not "BN degrades".
    """
    return [microbatch_claim(results, "groupnorm", "GN", task=_task_of(results))] if _task_of(results) else []


def _task_of(results: list[dict[str, Any]]) -> str | None:
    tasks = [r["task"] for r in results if r.get("model") == "cnn"]
    return tasks[0] if tasks else None


#: Cross-entropy of a 10-class classifier that learned nothing (uniform prediction): ln 10 nats.
CHANCE_LOSS = math.log(10)

#: The papers' micro-batch setting, quoted beside ours.
GN_PAPER_SETTING = "ImageNet ResNet-50, 8 GPUs, batch 32 → 2 per GPU: BN error +12 pt, GN flat"


def microbatch_claim(
    results: list[dict[str, Any]], other: str, other_label: str, *, task: str, source: str = "Wu & He 2018 (GroupNorm)"
) -> str:
    """Paired-seed verdict on "from batch 64 to 2, BN's accuracy drops, and by more than ``other``'s"."""
    bn64, bn2 = {"model": "cnn", "norm": "batchnorm", "batch_size": 64}, {"model": "cnn", "norm": "batchnorm", "batch_size": 2}
    o64, o2 = {"model": "cnn", "norm": other, "batch_size": 64}, {"model": "cnn", "norm": other, "batch_size": 2}
    drop_bn = paired_verdict(paired_differences(results, [bn64], [bn2]))
    gap = paired_verdict(paired_differences(results, [bn64, o2], [bn2, o64]))
    acc = {k: seed_mean(results, **m) for k, m in {"bn64": bn64, "bn2": bn2, "o64": o64, "o2": o2}.items()}
    ours = (
        f"{task} CNN, batch 64 → 2: BN {pct(acc['bn64'])} → {pct(acc['bn2'])}, {other_label} {pct(acc['o64'])} → {pct(acc['o2'])}"
    )
    arms = {"BN bs64": bn64, "BN bs2": bn2, f"{other_label} bs64": o64, f"{other_label} bs2": o2}
    return format_claim(
        source,
        f"BN accuracy drops at batch 2, {other_label}'s much less",
        {"BN drop": drop_bn, f"BN drop − {other_label} drop": gap},
        paper=GN_PAPER_SETTING,
        ours=ours,
        untrained=not_learned(results, arms, level=CHANCE_LOSS, name="chance"),
    )


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


@register_suite(
    "quick",
    description="digits CNN: BN vs GN at batch 64 and 2 (GN's claim); tiny ViT: LN, RMSNorm, DyT (~2 min on 2 idle cores)",
    claims=_quick_claims,
    seeds=3,
    full_seeds=3,
    scope="ImageNet-scale effects (ResNet-50, 1.2M images): ours is a 3-conv CNN on 8×8 digits, where BN barely suffers.",
)
def quick(cfg: SuiteConfig) -> list[Job]:
    """A first look in about 2 minutes on 2 cores: digits CNN (BN, GN at batch 64 and 2) and tiny ViT.

    On the harder scenes task the quick budget (3 epochs) left BN at chance at batch 64 and took
    6.6 min (2026-12-03), so the first look stays on digits; the other micro-batch norms' claims live
    in the ``microbatch`` suite (on scenes, 3 epochs: ~7 min of CPU at batch 2 alone). A
    fixed list keeps it short as the zoo grows.
    """
    return digits_jobs(cfg, image_norms=QUICK_IMAGE_NORMS, token_norms=QUICK_TOKEN_NORMS, epochs=QUICK_EPOCHS)


#: (CNN, ViT) epochs of the quick suite, with and without ``--full`` (the same: 3 paired seeds, the interval
#: t = 4.3 · s/√3). 6 CNN epochs: GN at batch 64 is still learning after 3 (66 steps: 85–93%, train loss
#: 0.6–0.85) or 4 (91.6%); 6 are 132 steps at batch 64 and 4314 at batch 2. ~220 CPU-s in all (2026-12-03).
QUICK_EPOCHS = (6, 10)
