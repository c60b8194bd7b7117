"""Paired-seed verdicts for the bench's claim lines.

Why paired: every method of a suite is trained with the same seeds, and a seed fixes the data
order and the initial weights of the layers the methods share (:func:`normkit.bench.train.train_run`
seeds before building). The per-seed *difference* between two methods therefore cancels most of
the seed-to-seed variation that both share, and its spread is the noise the claim must beat.

For paired differences ``d_1 … d_n`` (one per seed) the verdict uses the mean ``d̄``, the sample
standard deviation ``s`` (``n − 1`` in the denominator) and the two-sided 95% Student-t interval::

    d̄ ± t_{0.975, n−1} · s / √n

A claim states a direction (``"greater"``: the difference is positive; ``"less"``: negative),
optionally beyond a ``margin``; ``"noninferior"`` claims ``d > −margin`` ("at least as good, up to
``margin``"); ``"equivalent"`` claims ``|d| < margin``:

================  ==============================  ==============================
claim             ``supported`` when              ``contradicted`` when
================  ==============================  ==============================
``greater``       low > margin                    high < margin (default margin 0: the
                                                  interval excludes 0 on the wrong side)
``less``          high < −margin                  low > −margin
``noninferior``   low > −margin                   high < −margin
``equivalent``    −margin < low and high < margin high < −margin or low > margin
================  ==============================  ==============================

Anything else is ``inconclusive``, as is every claim with fewer than two seeds (no interval).
A ``margin`` > 0 is part of the claim ("at least 5 pt"), so "contradicted" then means "the
effect is smaller than the claim says", which may still be an effect in the claimed direction.

The interval is the textbook one-sample t interval on the differences (Student 1908); it assumes
roughly normal per-seed differences, which is what averaging a whole test set per seed gives.
No multiple-comparison correction: each line is one pre-stated claim, not a search.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Label = Literal["supported", "contradicted", "inconclusive"]
Direction = Literal["greater", "less", "noninferior", "equivalent"]
LABELS: tuple[Label, ...] = ("supported", "contradicted", "inconclusive")
DIRECTIONS: tuple[Direction, ...] = ("greater", "less", "noninferior", "equivalent")

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (standard tables).
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: the table for ``df ≤ 30``, the Cornish-Fisher expansion beyond (error < 1e-5).

    Kept free of scipy so the verdicts work with the base install.
    """
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    # Abramowitz & Stegun 26.7.5, first three correction terms.
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclass(frozen=True)
class Verdict:
    """The verdict on one claim from its paired per-seed differences."""

    label: Label
    mean: float  # mean difference d̄ (nan without data)
    low: float  # 95% interval; nan with fewer than 2 seeds
    high: float
    n: int  # seeds (pairs)
    direction: Direction
    margin: float = 0.0

    def interval(self, scale: float = 100.0, unit: str = " pt", digits: int = 1) -> str:
        """``"+3.2 pt [+1.1, +5.3] 95% CI, 5 seeds"`` (``scale`` 100 turns accuracy fractions into points)."""
        if self.n == 0:
            return "no paired seeds"
        seeds = f"{self.n} seed{'s' if self.n != 1 else ''}"
        f = f"+.{digits}f"
        if math.isnan(self.low):
            return f"{self.mean * scale:{f}}{unit}, {seeds} (no interval: use --seeds ≥ 2)"
        return f"{self.mean * scale:{f}}{unit} [{self.low * scale:{f}}, {self.high * scale:{f}}] 95% CI, {seeds}"


def paired_verdict(diffs: Iterable[float], direction: Direction = "greater", margin: float = 0.0) -> Verdict:
    """Verdict on ``diffs`` (one paired difference per seed) for a claim of ``direction`` (see the module doc)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if not (isinstance(margin, int | float) and margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if direction == "equivalent" and margin == 0:
        raise ValueError("an 'equivalent' claim needs a margin > 0 (|difference| < margin)")
    d = [float(x) for x in diffs]
    if any(not math.isfinite(x) for x in d):
        raise ValueError(f"paired differences must be finite, got {d}")
    n = len(d)
    if n == 0:
        return Verdict("inconclusive", math.nan, math.nan, math.nan, 0, direction, margin)
    mean = statistics.fmean(d)
    if n == 1:
        return Verdict("inconclusive", mean, math.nan, math.nan, 1, direction, margin)
    half = t_quantile_975(n - 1) * statistics.stdev(d) / math.sqrt(n)
    low, high = mean - half, mean + half
    if direction == "greater":
        label: Label = "supported" if low > margin else "contradicted" if high < margin else "inconclusive"
    elif direction == "less":
        label = "supported" if high < -margin else "contradicted" if low > -margin else "inconclusive"
    elif direction == "noninferior":
        label = "supported" if low > -margin else "contradicted" if high < -margin else "inconclusive"
    else:
        inside = -margin < low and high < margin
        label = "supported" if inside else "contradicted" if (high < -margin or low > margin) else "inconclusive"
    return Verdict(label, mean, low, high, n, direction, margin)


# --------------------------------------------------------------------------- per-seed values from result rows

Match = Mapping[str, Any]


def per_seed(results: Iterable[Mapping[str, Any]], metric: str = "test_acc", **match: Any) -> dict[int, float]:
    """``{seed: metric}`` of the successful runs whose fields equal ``match``.

    Rows that carry ``replicate_seeds`` with a per-replicate list (``<metric>_replicates``, or
    ``acc_replicates`` for ``test_acc``) contribute one value per replicate seed: such jobs run
    their own paired seeds internally (e.g. the continual suite).
    """
    out: dict[int, float] = {}
    for r in results:
        if r.get("status") != "ok" or not all(r.get(k) == v for k, v in match.items()):
            continue
        reps = r.get(f"{metric}_replicates", r.get("acc_replicates") if metric == "test_acc" else None)
        if r.get("replicate_seeds") and reps is not None:
            out.update(zip((int(s) for s in r["replicate_seeds"]), (float(v) for v in reps)))
        elif r.get(metric) is not None:
            out[int(r.get("seed", 0))] = float(r[metric])
    return out


def paired_differences(
    results: Sequence[Mapping[str, Any]],
    plus: Sequence[Match],
    minus: Sequence[Match] = (),
    metric: str = "test_acc",
) -> list[float]:
    """Per seed, ``Σ metric(plus) − Σ metric(minus)`` over the seeds every selection has.

    ``plus=[A], minus=[B]`` is the plain difference A − B; ``plus=[BN64, GN2], minus=[BN2, GN64]``
    is a difference of differences (BN's drop minus GN's drop), still paired per seed.
    """
    series = [per_seed(results, metric, **m) for m in plus] + [per_seed(results, metric, **m) for m in minus]
    if not series:
        raise ValueError("paired_differences needs at least one selection in plus")
    common = sorted(set.intersection(*(set(s) for s in series)))
    k = len(plus)
    return [sum(s[seed] for s in series[:k]) - sum(s[seed] for s in series[k:]) for seed in common]


def advantage(
    results: Sequence[Mapping[str, Any]],
    a: Match,
    b: Match,
    *,
    metric: str = "test_acc",
    lower_is_better: bool = False,
    direction: Direction = "greater",
    margin: float = 0.0,
) -> Verdict:
    """Verdict on "``a`` is better than ``b``" from paired seeds: d = a − b, or b − a for a loss.

    The sign convention makes a positive difference always mean "``a`` better", so ``direction``
    reads the same for accuracies and losses (``"noninferior"``: ``a`` no worse than ``b`` − margin).
    """
    d = paired_differences(results, [b], [a], metric) if lower_is_better else paired_differences(results, [a], [b], metric)
    return paired_verdict(d, direction, margin)


def seed_mean(results: Iterable[Mapping[str, Any]], metric: str = "test_acc", **match: Any) -> float | None:
    """Mean over seeds of :func:`per_seed` (None without runs), for the numbers quoted beside a verdict."""
    values = per_seed(results, metric, **match)
    return statistics.fmean(values.values()) if values else None


# --------------------------------------------------------------------------- claim lines


def combine(verdicts: Iterable[Verdict]) -> Label:
    """Label of a claim made of several parts that must all hold ("BN drops, and more than GN").

    ``supported`` only if every part is; ``contradicted`` if any part is; else ``inconclusive``.
    """
    labels = [v.label for v in verdicts]
    if not labels:
        return "inconclusive"
    if "contradicted" in labels:
        return "contradicted"
    return "supported" if all(label == "supported" for label in labels) else "inconclusive"


def not_learned(
    results: Iterable[Mapping[str, Any]], arms: Mapping[str, Match], *, level: float, name: str, factor: float = 0.95
) -> list[str]:
    """The arms of a claim that did not clearly learn: some seed's ``train_loss`` ≥ ``factor · level``.

    ``level`` is the loss of a model that learned nothing useful (``ln(classes)`` for a classifier, the
    unigram entropy for a language model); ``name`` says which (for the message). A comparison with an
    untrained arm says nothing about the paper's claim, whatever its interval, so :func:`format_claim`
    reads it as ``inconclusive`` with these notes. Returns ``"label (k/n seeds at the <name> level,
    train loss x)"`` per such arm; empty when every arm learned (or has no rows).
    """
    rows = list(results)
    notes = []
    for label, match in arms.items():
        losses = per_seed(rows, "train_loss", **match)
        stuck = [v for v in losses.values() if not v < factor * level]
        if stuck:
            notes.append(f"{label} ({len(stuck)}/{len(losses)} seeds at the {name} level, train loss {max(stuck):.2f} ≥ "
                         f"{factor:g} × {level:.2f})")  # fmt: skip
    return notes


def format_claim(
    source: str,
    claim: str,
    verdict: Verdict | Mapping[str, Verdict],
    *,
    paper: str,
    ours: str,
    scale: float = 100.0,
    unit: str = " pt",
    digits: int = 1,
    untrained: Sequence[str] = (),
) -> str:
    """One claim line: ``[supported] source: claim | paper: setting | ours: setting, numbers | Δ …``.

    ``paper`` quotes the paper's setting (data, model, batch) and ``ours`` ours with the measured
    numbers, side by side, so a reader sees what the verdict is and is not about. A mapping
    ``{part name: verdict}`` is a claim of several parts, labelled by :func:`combine`, each part's
    interval shown under its name. ``untrained`` (from :func:`not_learned`) names arms that did not
    learn: the line is then ``inconclusive`` whatever the interval says, with a ``not decided`` note.
    """
    if isinstance(verdict, Verdict):
        label, delta = verdict.label, verdict.interval(scale, unit, digits)
    else:
        label = combine(verdict.values())
        delta = "; ".join(f"{name} {v.interval(scale, unit, digits)} ({v.label})" for name, v in verdict.items())
    note = ""
    if untrained:
        label, note = "inconclusive", " | not decided: did not learn: " + "; ".join(untrained)
    return f"[{label}] {source}: {claim} | paper: {paper} | ours: {ours} | Δ {delta}{note}"


def claim_line(source: str, claim: str, ours: str, holds: bool | None) -> str:
    """Old single-comparison claim line, kept for suites not yet migrated to :func:`format_claim`.

    A boolean from one comparison has no interval, so ``True``/``False`` map to ``supported`` /
    ``contradicted`` marked "(direction only, no interval)", and ``None`` to ``inconclusive``.
    """
    label = {True: "supported", False: "contradicted", None: "inconclusive"}[holds]
    note = "" if holds is None else " (direction only, no interval)"
    return f"[{label}] {source}: {claim} | ours: {ours}{note}"


def label_of(line: str) -> str | None:
    """The verdict label at the start of a claim line (``None`` for notes and other lines)."""
    if line.startswith("[") and "]" in line:
        label = line[1 : line.index("]")]
        return label if label in LABELS else None
    return None
