"""Paired-seed verdicts: the t interval against a plainly written formula, labels at the boundaries."""

from __future__ import annotations

import math

import pytest

from normkit.bench.verdict import (
    claim_line,
    combine,
    format_claim,
    label_of,
    not_learned,
    paired_differences,
    paired_verdict,
    per_seed,
    t_quantile_975,
)

# Student-t 97.5% quantiles from a printed table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 19: 2.093, 29: 2.045, 40: 2.021, 60: 2.000, 100: 1.984}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile_975(df) == pytest.approx(TABLE[df], abs=1e-3)


def test_t_quantile_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 300):
        assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-5)


def _interval(d):
    """Textbook: mean ± t·s/√n with s the n−1 standard deviation."""
    n = len(d)
    m = sum(d) / n
    s = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    h = TABLE_EXACT[n - 1] * s / math.sqrt(n)
    return m - h, m + h


TABLE_EXACT = {2: 4.302653, 3: 3.182446, 4: 2.776445}


def test_interval_is_the_textbook_one():
    d = [0.01, 0.03, 0.02, 0.05, 0.04]
    v = paired_verdict(d)
    low, high = _interval(d)
    assert (v.low, v.high, v.n) == (pytest.approx(low), pytest.approx(high), 5)
    assert v.mean == pytest.approx(0.03) and v.label == "supported"


def _just(side: float, target: float, n: int = 3, spread: float = 0.01) -> list[float]:
    """n differences whose interval's ``side`` (-1 low, +1 high) bound sits at ``target``."""
    base = [-spread, 0.0, spread][:n]
    half = TABLE_EXACT[n - 1] * math.sqrt(sum(b * b for b in base) / (n - 1)) / math.sqrt(n)
    mean = target - side * half
    return [mean + b for b in base]


@pytest.mark.parametrize("eps, label", [(1e-4, "supported"), (-1e-4, "inconclusive")])
def test_greater_at_the_zero_boundary(eps, label):
    assert paired_verdict(_just(-1, eps)).label == label  # low just above / below 0


@pytest.mark.parametrize("eps, label", [(-1e-4, "contradicted"), (1e-4, "inconclusive")])
def test_greater_contradicted_when_the_interval_is_below_zero(eps, label):
    assert paired_verdict(_just(+1, eps)).label == label  # high just below / above 0


def test_less_mirrors_greater():
    assert paired_verdict(_just(+1, -1e-4), "less").label == "supported"
    assert paired_verdict(_just(-1, 1e-4), "less").label == "contradicted"
    assert paired_verdict([-0.01, 0.01, 0.0], "less").label == "inconclusive"


def test_margin_is_part_of_the_claim():
    d = [0.03, 0.04, 0.05]  # a clear positive effect of about 4 pt
    assert paired_verdict(d).label == "supported"
    assert paired_verdict(d, margin=0.01).label == "supported"
    assert paired_verdict(d, margin=0.10).label == "contradicted"  # "at least 10 pt": the effect is smaller
    assert paired_verdict(d, margin=0.04).label == "inconclusive"


def test_noninferiority():
    assert paired_verdict([-0.004, -0.006, -0.005], "noninferior", margin=0.01).label == "supported"
    assert paired_verdict([-0.04, -0.06, -0.05], "noninferior", margin=0.01).label == "contradicted"
    assert paired_verdict([-0.03, 0.01, -0.01], "noninferior", margin=0.01).label == "inconclusive"


def test_combined_claims():
    yes, no, maybe = paired_verdict([0.03, 0.04, 0.05]), paired_verdict([-0.03, -0.04, -0.05]), paired_verdict([0.1, -0.1])
    assert combine([yes, yes]) == "supported" and combine([yes, maybe]) == "inconclusive"
    assert combine([yes, no, maybe]) == "contradicted" and combine([]) == "inconclusive"
    line = format_claim("S", "c", {"BN drop": yes, "BN − GN drop": maybe}, paper="p", ours="o")
    assert line.startswith("[inconclusive] S: c | paper: p | ours: o | Δ BN drop +4.0 pt")
    assert "(supported); BN − GN drop" in line


def test_equivalence():
    assert paired_verdict([0.001, -0.001, 0.002, 0.0], "equivalent", margin=0.01).label == "supported"
    assert paired_verdict([0.05, 0.06, 0.055], "equivalent", margin=0.01).label == "contradicted"
    assert paired_verdict([0.0, 0.02, -0.02], "equivalent", margin=0.01).label == "inconclusive"
    with pytest.raises(ValueError, match="margin > 0"):
        paired_verdict([0.0, 0.1], "equivalent")


def test_too_few_seeds_is_inconclusive():
    one = paired_verdict([0.5])
    assert one.label == "inconclusive" and one.n == 1 and math.isnan(one.low)
    assert "no interval" in one.interval()
    none = paired_verdict([])
    assert none.label == "inconclusive" and none.n == 0 and none.interval() == "no paired seeds"
    # identical differences: zero width, decided by the sign
    assert paired_verdict([0.02, 0.02]).label == "supported"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"direction": "up"}, "direction must be one of"),
        ({"margin": -1.0}, "margin must be"),
        ({"diffs": [float("nan")]}, "finite"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = {"diffs": [0.1, 0.2], **kwargs}
    with pytest.raises(ValueError, match=match):
        paired_verdict(**args)


def test_paired_differences_use_common_seeds_and_difference_of_differences():
    rows = [
        {"norm": n, "batch_size": bs, "seed": s, "test_acc": acc, "status": "ok"}
        for (n, bs, s, acc) in [
            ("bn", 64, 0, 0.9), ("bn", 2, 0, 0.5), ("gn", 64, 0, 0.8), ("gn", 2, 0, 0.78),
            ("bn", 64, 1, 0.92), ("bn", 2, 1, 0.6), ("gn", 64, 1, 0.81), ("gn", 2, 1, 0.8),
            ("bn", 64, 2, 0.9),  # seed 2 has no partner runs: left out
        ]
    ]  # fmt: skip
    rows.append({"norm": "gn", "batch_size": 2, "seed": 2, "test_acc": None, "status": "error"})
    d = paired_differences(
        rows,
        plus=[{"norm": "bn", "batch_size": 64}, {"norm": "gn", "batch_size": 2}],
        minus=[{"norm": "bn", "batch_size": 2}, {"norm": "gn", "batch_size": 64}],
    )
    assert d == pytest.approx([(0.9 - 0.5) - (0.8 - 0.78), (0.92 - 0.6) - (0.81 - 0.8)])


def test_per_seed_expands_internal_replicates():
    rows = [{"norm": "a", "seed": 0, "status": "ok", "test_acc": 0.5, "replicate_seeds": [0, 1], "acc_replicates": [0.4, 0.6]}]
    assert per_seed(rows, norm="a") == {0: 0.4, 1: 0.6}


def test_claim_lines():
    v = paired_verdict([0.03, 0.04, 0.05])
    line = format_claim("Wu & He 2018", "BN drops more", v, paper="ImageNet, batch 32 vs 2", ours="scenes, batch 64 vs 2")
    assert line.startswith("[supported] Wu & He 2018: BN drops more | paper: ImageNet, batch 32 vs 2 | ours: scenes")
    assert "+4.0 pt [+1.5, +6.5] 95% CI, 3 seeds" in line and label_of(line) == "supported"
    # the old single-comparison form maps to the new labels and says it has no interval
    assert claim_line("S", "c", "o", True) == "[supported] S: c | ours: o (direction only, no interval)"
    assert label_of(claim_line("S", "c", "o", False)) == "contradicted"
    assert label_of(claim_line("S", "c", "o", None)) == "inconclusive"
    assert label_of("    note: something") is None


def test_an_untrained_arm_makes_the_claim_undecided():
    level = math.log(10)  # a 10-class classifier that learned nothing
    rows = [
        {"norm": n, "seed": s, "status": "ok", "train_loss": loss}
        for n, losses in {"bn": [2.30, 2.28, 0.4], "gn": [0.5, 0.6, 0.55]}.items()
        for s, loss in enumerate(losses)
    ]
    notes = not_learned(rows, {"BN": {"norm": "bn"}, "GN": {"norm": "gn"}}, level=level, name="chance")
    # threshold 0.95 · ln 10 = 2.187: two BN seeds are above it, no GN seed
    assert notes == [f"BN (2/3 seeds at the chance level, train loss 2.30 ≥ 0.95 × {level:.2f})"]
    assert not_learned(rows, {"GN": {"norm": "gn"}}, level=level, name="chance") == []
    line = format_claim("S", "c", paired_verdict([0.03, 0.04, 0.05]), paper="p", ours="o", untrained=notes)
    assert label_of(line) == "inconclusive" and line.endswith("| not decided: did not learn: " + notes[0])
    assert "+4.0 pt [+1.5, +6.5]" in line  # the interval is still shown
