"""Bench suite ``optim``: registration, a tiny-scale run of every job, and the claims on synthetic rows."""

from __future__ import annotations

import pytest

from normkit.bench import get_suite, run
from normkit.bench.suites import SuiteConfig
from normkit.bench.suites_optim import _optim_claims
from normkit.bench.verdict import label_of


def test_registered_with_paired_seeds() -> None:
    suite = get_suite("optim")
    assert suite.seeds >= 5 and suite.full_seeds >= suite.seeds
    jobs = list(suite.jobs(SuiteConfig()))
    assert {j.extra["claim"] for j in jobs} == {"projection", "nap", "sinkgd", "agc", "bngrad"}
    assert all(j.run is not None for j in jobs)


def test_tiny_run_gives_ok_rows_and_claim_lines(tmp_path) -> None:
    rows = run("optim", scale=0.03, seeds=2, out_dir=tmp_path, progress=False, threads=1, workers=1)
    bad = [(r["norm"], r["error"]) for r in rows if r["status"] != "ok"]
    assert not bad
    assert {r["claim"] for r in rows} == {"projection", "nap", "sinkgd", "agc", "bngrad"}
    nap = [r for r in rows if r["norm"] == "nap"]
    assert all(abs(r["elr_ratio"] - 1) < 0.05 for r in nap)  # NaP holds lr/‖W‖² (W alone; (W, b) exactly)
    lines = _optim_claims(rows)
    assert len(lines) == 6 and all(label_of(line) is not None for line in lines)
    assert (tmp_path / "optim_bngrad_layers.png").exists() and (tmp_path / "optim_nap_phases.png").exists()


def _row(claim: str, norm: str, seed: int, **values: float) -> dict:
    return {"claim": claim, "norm": norm, "seed": seed, "status": "ok", **values}


def test_claim_verdicts_follow_the_paired_differences() -> None:
    rows = []
    for s in range(5):
        rows += [
            _row("projection", "adamw", s, weight_norm=6.0 + 0.1 * s, test_acc=0.95),
            _row("projection", "adamp", s, weight_norm=3.0 + 0.1 * s, test_acc=0.96),
            _row("bngrad", "orthogonal", s, log_grad_growth=0.01 * s, log_grad_shallow=0.3, log_grad_deep=0.3),
            _row("bngrad", "normal", s, log_grad_growth=1.5 + 0.01 * s, log_grad_shallow=0.7, log_grad_deep=2.2),
        ]
    lines = _optim_claims(rows)
    assert len(lines) == 2
    assert all(label_of(line) == "supported" for line in lines)
    rows = [dict(r, weight_norm=r["weight_norm"] + (5 if r["norm"] == "adamp" else 0)) for r in rows if r["claim"] != "bngrad"]
    assert label_of(_optim_claims(rows)[0]) == "contradicted"


@pytest.mark.parametrize("claim", ["nap", "sinkgd", "agc"])
def test_claims_need_both_arms(claim: str) -> None:
    arm = {"nap": "nap", "sinkgd": "sinkgd", "agc": "sgd+agc"}[claim]
    assert _optim_claims([_row(claim, arm, 0, test_acc=0.5)]) == []
