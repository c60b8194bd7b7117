"""Bench suites ``tta`` (test-time adaptation on digits-C) and ``normonly`` (training only BatchNorm).

``tta``: the bench's small CNN with BatchNorm is trained on clean digits (once per seed, shared by
all jobs), then streamed through digits-C at severity 5 (8 corruptions, :mod:`normkit.adapt.streams`)
with every :class:`~normkit.adapt.TestTimeAdapter` method at batch sizes 64, 16, 4 and 1, in i.i.d.
and label-correlated (Dirichlet δ = 0.1, UnMix-TNS's protocol) order. The adapter is reset at each
domain change (single-domain TTA, as CIFAR-10-C results are reported); accuracy is online (each batch
is scored on the prediction made while adapting to it), averaged over the corruptions. Because a
digits domain has 359 images — CIFAR-10-C's have 10,000 — a second protocol (``…/long``) streams
every domain 10 times (fresh noise per pass) at batch 64, which gives stateful methods time to move
and label-correlated chunks longer than a batch, as in the paper's setting.

``normonly``: the same CNN from random init, trained with only its BatchNorm γ/β (everything else
frozen at init, the classifier too: Frankle et al.'s "BatchNorm only"), with the same number of
randomly chosen other parameters (their control), with BN + the output layer, and fully.

In the ``tta`` leaderboard, "train loss" is the source model's (shared by all rows) and "ms/step" is
per adapted test batch (streams run on one intra-op thread). The test set has 359 images, so gaps
under about one point are within seed noise; ``--full`` runs three seeds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normkit.bench.models import SmallCNN
from normkit.bench.suites import Job, SuiteConfig, pct, register_suite
from normkit.bench.train import torch_threads, total_steps, train_run
from normkit.bench.verdict import advantage, format_claim, paired_verdict, per_seed, seed_mean

# --------------------------------------------------------------------------- tta

TTA_METHODS = ("source", "tbn", "alpha_bn", "ema_bn", "robust_bn", "unmix_tns", "tent")
TTA_BATCH_SIZES = (64, 16, 4, 1)
TTA_ORDERS = ("iid", "dirichlet")
TTA_SEVERITY = 5
TTA_DELTA = 0.1
LONG_PASSES = 10
LONG_BATCH_SIZE = 64
#: options per method (the library defaults, written out so result rows record them)
TTA_OPTIONS: dict[str, dict[str, Any]] = {
    "alpha_bn": {"alpha": 0.1},
    "ema_bn": {"momentum": 0.1},
    "robust_bn": {"momentum": 0.05},
    "unmix_tns": {"num_components": 16, "batch_size_max": 64},
    "tent": {"optimizer": "adam", "lr": 1e-3, "steps": 1},
}
CHANCE = 0.1


@dataclass(frozen=True)
class _Source:
    state: dict[str, torch.Tensor]
    test_acc: float
    train_loss: float
    epochs_done: float
    train_time_s: float
    params: int


_SOURCES: dict[tuple[Any, ...], _Source] = {}


def _source_model(seed: int, scale: float, epochs: float, lr: float) -> _Source:
    """The CNN trained on clean digits for ``seed`` (cached: every TTA job of a run adapts the same model)."""
    key = (seed, scale, epochs, lr)
    if key not in _SOURCES:
        box: dict[str, nn.Module] = {}

        def keep(model: nn.Module, _data: Any) -> dict[str, Any]:
            box["model"] = copy.deepcopy(model)
            return {}

        job = Job("digits", "cnn", "batchnorm", SmallCNN, 64, epochs, lr, measure=keep)
        row = train_run(job, seed, scale=scale)
        if row["status"] != "ok":
            raise RuntimeError(f"training the source model failed: {row['error']}")
        _SOURCES[key] = _Source(
            {k: v.clone() for k, v in box["model"].state_dict().items()}, row["test_acc"], row["train_loss"],
            row["epochs_done"], row["train_time_s"], row["params"],
        )  # fmt: skip
    return _SOURCES[key]


def _tta_run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``Job.run`` hook: adapt the (cached) source model over a digits-C stream and score it online."""
    from normkit.adapt.streams import digits_c_stream
    from normkit.adapt.tta import TestTimeAdapter

    src = _source_model(seed, scale, job.epochs, job.lr)
    model = SmallCNN("batchnorm")
    model.load_state_dict(src.state)
    ex = job.extra
    limit = None if scale >= 1 else max(4, round(359 * scale))
    stream = digits_c_stream(
        severity=ex["severity"], batch_size=job.batch_size, order=ex["order"], delta=ex["delta"], seed=seed,
        limit=limit, passes=ex["passes"],
    )  # fmt: skip
    adapter = TestTimeAdapter(model, job.norm, **ex["options"])
    # Advance the progress bar by the runner's step count for this job, spread over the batches.
    expected = total_steps(job, job.data(), scale)
    correct: dict[str, int] = {}
    seen: dict[str, int] = {}
    current = None
    reported = 0
    # The stream is thousands of tiny-batch calls: one intra-op thread is faster than two, and two
    # threads spin-wait badly when the cores are shared (>100× slower on a loaded 2-core machine).
    t0 = time.perf_counter()
    with torch_threads(1), torch.enable_grad() if job.norm == "tent" else torch.no_grad():
        for i, batch in enumerate(stream):
            if batch.domain != current:
                adapter.reset()
                current = batch.domain
            pred = adapter(batch.x).argmax(1)
            correct[current] = correct.get(current, 0) + int((pred == batch.y).sum())
            seen[current] = seen.get(current, 0) + len(batch.y)
            if on_step is not None:
                target = round(expected * (i + 1) / len(stream))
                on_step(target - reported)
                reported = target
    elapsed = time.perf_counter() - t0
    per_domain = {d: correct[d] / seen[d] for d in correct}
    return {
        **{f"acc_{d}": a for d, a in per_domain.items()},
        "clean_acc": src.test_acc,
        "adapt_batches": len(stream),
        "stream_samples": stream.num_samples,
        "steps": len(stream),
        "epochs_done": src.epochs_done,
        "test_acc": sum(per_domain.values()) / len(per_domain),
        "train_loss": src.train_loss,  # of the shared source model
        "ms_per_step": elapsed / len(stream) * 1e3,  # per adapted test batch
        "train_time_s": src.train_time_s,
        "params": src.params,
        "status": "ok",
        "error": "",
    }


def _tta_job(method: str, batch_size: int, order: str, passes: int, epochs: float) -> Job:
    model = f"cnn/{order}" + ("/long" if passes > 1 else "")
    extra = {
        "order": order, "delta": TTA_DELTA if order == "dirichlet" else None, "severity": TTA_SEVERITY, "passes": passes,
        "options": dict(TTA_OPTIONS.get(method, {})),
    }  # fmt: skip
    return Job(f"digits-C{TTA_SEVERITY}", model, method, SmallCNN, batch_size, epochs, 1e-2, extra=extra, run=_tta_run)


TTA_PAPER = "CIFAR-10-C sev. 5, ResNet, 10,000 images per corruption"


def _tta_claims(results: list[dict[str, Any]]) -> list[str]:
    def sel(method: str, bs: int, model: str) -> dict[str, Any]:
        return {"norm": method, "batch_size": bs, "model": model}

    def acc(method: str, bs: int, model: str) -> str:
        return pct(seed_mean(results, **sel(method, bs, model)))

    present = {(r["norm"], r["batch_size"], r["model"]) for r in results if r["status"] == "ok"}

    def have(*keys: tuple[str, int, str]) -> bool:
        return all(k in present for k in keys)

    task = next((r["task"] for r in results if r["status"] == "ok"), "digits-C")
    lines: list[str] = []
    for bs in (1, 4):
        m = "cnn/iid"
        if not have(("alpha_bn", bs, m), ("source", bs, m), ("tbn", bs, m)):
            continue
        parts = {
            "α-BN − source": advantage(results, sel("alpha_bn", bs, m), sel("source", bs, m)),
            "α-BN − TBN": advantage(results, sel("alpha_bn", bs, m), sel("tbn", bs, m)),
        }
        lines.append(format_claim(
            "You et al. 2021 (α-BN, arXiv:2110.04065)",
            f"at batch size {bs}, α-BN (α = 0.1) beats both the source statistics and test-batch BN",
            parts,
            paper=f"{TTA_PAPER}, batch 1-16",
            ours=f"{task} (i.i.d. stream), batch {bs}: α-BN {acc('alpha_bn', bs, m)}, source {acc('source', bs, m)}, "
                 f"TBN {acc('tbn', bs, m)}",
        ))  # fmt: skip

    bs = LONG_BATCH_SIZE
    for suffix, label in (("", "one pass per domain"), ("/long", f"each domain × {LONG_PASSES}")):
        iid, cor = f"cnn/iid{suffix}", f"cnn/dirichlet{suffix}"
        if not have(("tbn", bs, iid), ("tbn", bs, cor), ("unmix_tns", bs, iid), ("unmix_tns", bs, cor)):
            continue
        parts = {
            "TBN i.i.d. − correlated": advantage(results, sel("tbn", bs, iid), sel("tbn", bs, cor)),
            "UnMix-TNS − TBN (correlated)": advantage(results, sel("unmix_tns", bs, cor), sel("tbn", bs, cor)),
        }
        lines.append(format_claim(
            "Tomar et al. 2024 (UnMix-TNS, arXiv:2401.08328)",
            "TBN loses accuracy on label-correlated streams and UnMix-TNS beats it there",
            parts,
            paper=f"{TTA_PAPER}, batch 64, Dirichlet δ = 0.1",
            ours=f"{task}, batch {bs}, {label}: TBN {acc('tbn', bs, iid)} → {acc('tbn', bs, cor)}, UnMix-TNS "
                 f"{acc('unmix_tns', bs, iid)} → {acc('unmix_tns', bs, cor)} (i.i.d. → Dirichlet δ = {TTA_DELTA}); "
                 f"source {acc('source', bs, iid)}",
        ))  # fmt: skip

    m = "cnn/iid/long"
    if have(("tent", bs, m), ("tbn", bs, m)):
        lines.append(format_claim(
            "Wang et al. 2021 (TENT, arXiv:2006.10726)",
            "entropy minimisation on the BN affine improves on test-batch BN alone",
            advantage(results, sel("tent", bs, m), sel("tbn", bs, m)),
            paper=f"{TTA_PAPER}, batch 128, Adam lr 1e-3",
            ours=f"{task}, batch {bs}, i.i.d., domains × {LONG_PASSES}: TENT {acc('tent', bs, m)} vs TBN {acc('tbn', bs, m)}",
        ))  # fmt: skip
    return lines


@register_suite(
    "tta",
    description="digits-C sev. 5: source, TBN, α-BN, EMA-BN, RoTTA-BN, UnMix-TNS, TENT at batch 64/16/4/1, i.i.d./correlated",
    claims=_tta_claims,
    scope="CIFAR-10-C with ResNet features and 10,000 images per domain: ours has 359 digits per domain and a 3-layer CNN.",
)
def tta(cfg: SuiteConfig) -> list[Job]:
    """Test-time adaptation of a BN CNN trained on clean digits, on corrupted digits (see the module docstring)."""
    epochs = 16 if cfg.full else 8
    jobs = [_tta_job(method, bs, order, 1, epochs) for order in TTA_ORDERS for bs in TTA_BATCH_SIZES for method in TTA_METHODS]
    jobs += [_tta_job(method, LONG_BATCH_SIZE, order, LONG_PASSES, epochs) for order in TTA_ORDERS for method in TTA_METHODS]
    return jobs


# --------------------------------------------------------------------------- normonly

NORMONLY_VARIANTS = ("bn_only", "random_subset", "bn+head", "full")
GAMMA_THRESHOLD = 0.01


def _normonly_build(variant: str) -> nn.Module:
    from normkit.adapt.norm_only import norm_parameter_count, train_only_norms, train_random_subset

    model = SmallCNN("batchnorm")
    if variant == "bn_only":
        train_only_norms(model)
    elif variant == "bn+head":
        train_only_norms(model, also=("head",))
    elif variant == "random_subset":
        # Seeded from torch's generator (seeded by the runner), so the subset differs per seed.
        train_random_subset(model, norm_parameter_count(model), seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    elif variant != "full":
        raise ValueError(f"unknown normonly variant {variant!r}; valid: {', '.join(NORMONLY_VARIANTS)}")
    return model


def _normonly_measure(model: nn.Module, _data: Any) -> Mapping[str, Any]:
    from normkit.adapt.norm_only import gamma_report

    report = gamma_report(model, GAMMA_THRESHOLD)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"gamma_near_zero": report.fraction, "trainable_params": trainable}


def _normonly_claims(results: list[dict[str, Any]]) -> list[str]:
    if seed_mean(results, norm="bn_only") is None:
        return []
    from normkit.adapt.norm_only import norm_parameter_count

    source = "Frankle et al. 2021 (BatchNorm only, arXiv:2003.00152)"
    paper = "CIFAR-10 ResNet-110: BN-only 69.5%, ImageNet ResNet-200: 32.3%"
    model = SmallCNN("batchnorm")
    n_bn, n_all = norm_parameter_count(model), sum(p.numel() for p in model.parameters())
    acc = {v: pct(seed_mean(results, norm=v)) for v in NORMONLY_VARIANTS}
    bn_only = {"norm": "bn_only"}
    chance3 = paired_verdict([a - 3 * CHANCE for a in per_seed(results, norm="bn_only").values()])
    lines = [
        format_claim(
            source,
            "training only the BN γ/β of a random-init CNN reaches far above chance (here: > 3× chance)",
            chance3,
            paper=paper,
            ours=f"digits CNN, {n_bn} of {n_all:,} parameters trained: BN-only {acc['bn_only']} (chance {CHANCE:.0%}); "
            f"full training {acc['full']}, BN + output layer {acc['bn+head']}",
        )
    ]
    if seed_mean(results, norm="random_subset") is not None:
        lines.append(format_claim(
            source,
            "BN-only training beats training the same number of randomly chosen other parameters",
            advantage(results, bn_only, {"norm": "random_subset"}),
            paper="CIFAR-10 ResNets: BN-only above random subsets of 2× the parameters",
            ours=f"BN-only {acc['bn_only']} vs {n_bn} random parameters {acc['random_subset']}",
        ))  # fmt: skip
    if per_seed(results, "gamma_near_zero", norm="full"):
        parts = {
            "BN-only fraction − 10%": paired_verdict(
                [f - 0.10 for f in per_seed(results, "gamma_near_zero", norm="bn_only").values()]
            ),
            "BN-only − full": advantage(results, bn_only, {"norm": "full"}, metric="gamma_near_zero"),
        }
        frac = {v: seed_mean(results, "gamma_near_zero", norm=v) for v in ("bn_only", "full")}
        lines.append(format_claim(
            source,
            f"BN-only training switches features off: many γ go to ≈ 0 (here: ≥ 10 % with |γ| < {GAMMA_THRESHOLD:g}, "
            "more than full training)",
            parts,
            paper="deep ResNets: about a third of γ near 0 after BN-only training",
            ours=f"{pct(frac['bn_only'])} of γ with |γ| < {GAMMA_THRESHOLD:g} after BN-only training vs "
            f"{pct(frac['full'])} after full training (3-conv CNN)",
        ))  # fmt: skip
    return lines


@register_suite(
    "normonly",
    description="digits CNN from random init: train only BN γ/β vs as many random parameters vs BN+head vs everything",
    claims=_normonly_claims,
    scope="deep ResNets trained long (where γ → 0 was seen): ours is a 3-layer CNN, short training.",
)
def normonly(cfg: SuiteConfig) -> list[Job]:
    """Frankle et al. 2021 on digits: what training only the BatchNorm affine parameters can do."""
    epochs = 40 if cfg.full else 20
    return [
        Job("digits", "cnn", v, _normonly_build, 64, epochs, 1e-2 if v == "full" else 1e-1, measure=_normonly_measure)
        for v in NORMONLY_VARIANTS
    ]
