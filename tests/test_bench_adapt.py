"""The ``tta`` and ``normonly`` bench suites at tiny scale, and their claim verdicts on synthetic results."""

from __future__ import annotations

import pytest

from normkit.bench import SUITES, SuiteConfig, run
from normkit.bench.suites_adapt import (
    LONG_BATCH_SIZE,
    NORMONLY_VARIANTS,
    TTA_BATCH_SIZES,
    TTA_METHODS,
    _normonly_claims,
    _tta_claims,
)

TINY = 0.02


def test_suites_are_registered_with_the_expected_jobs():
    assert {"tta", "normonly"} <= set(SUITES)
    jobs = SUITES["tta"].jobs(SuiteConfig())
    keys = {(j.model, j.norm, j.batch_size) for j in jobs}
    assert len(jobs) == len(keys) == len(TTA_METHODS) * (2 * len(TTA_BATCH_SIZES) + 2)
    assert ("cnn/dirichlet/long", "unmix_tns", LONG_BATCH_SIZE) in keys and ("cnn/iid", "tent", 1) in keys
    assert [j.norm for j in SUITES["normonly"].jobs(SuiteConfig())] == list(NORMONLY_VARIANTS)


@pytest.mark.slow
def test_tta_suite_runs_at_tiny_scale(tmp_path, capsys):
    results = run(
        "tta", scale=TINY, norms=["source", "tbn", "alpha_bn", "unmix_tns"], out_dir=tmp_path, progress=False, threads=1
    )
    assert len(results) == 4 * (2 * len(TTA_BATCH_SIZES) + 2)
    for r in results:
        assert r["status"] == "ok", r.get("traceback", r["error"])
        assert 0.0 <= r["test_acc"] <= 1.0 and r["steps"] >= 1 and r["clean_acc"] > 0
        assert set(k for k in r if k.startswith("acc_")) == {f"acc_{c}" for c in ("gaussian_noise", "contrast", "pixelate")} | {
            f"acc_{c}" for c in ("shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "brightness")
        }
    # every method adapts the same cached source model: identical clean accuracy and source rows across batch sizes
    assert len({r["clean_acc"] for r in results}) == 1
    assert len({r["test_acc"] for r in results if r["norm"] == "source" and r["model"] == "cnn/iid"}) == 1
    out = capsys.readouterr().out
    assert "You et al. 2021 (α-BN)" in out and "Tomar et al. 2024 (UnMix-TNS)" in out


def test_normonly_suite_runs_at_tiny_scale(tmp_path, capsys):
    results = run("normonly", scale=TINY, out_dir=tmp_path, progress=False, threads=1)
    assert [r["norm"] for r in results] == list(NORMONLY_VARIANTS)
    trainable = {r["norm"]: r["trainable_params"] for r in results}
    assert trainable["bn_only"] == 160 and trainable["full"] == results[0]["params"]
    assert all(r["status"] == "ok" and 0.0 <= r["gamma_near_zero"] <= 1.0 for r in results)
    assert "Frankle et al. 2021" in capsys.readouterr().out


def _row(model, norm, bs, acc):
    return {"model": model, "norm": norm, "batch_size": bs, "test_acc": acc, "status": "ok"}


def test_tta_claim_verdicts():
    rows = [
        _row("cnn/iid", "alpha_bn", 1, 0.5), _row("cnn/iid", "source", 1, 0.45), _row("cnn/iid", "tbn", 1, 0.1),
        _row("cnn/iid", "alpha_bn", 4, 0.5), _row("cnn/iid", "source", 4, 0.45), _row("cnn/iid", "tbn", 4, 0.7),
        _row("cnn/iid", "tbn", 64, 0.8), _row("cnn/dirichlet", "tbn", 64, 0.4),
        _row("cnn/iid", "unmix_tns", 64, 0.7), _row("cnn/dirichlet", "unmix_tns", 64, 0.69), _row("cnn/iid", "source", 64, 0.45),
        _row("cnn/iid/long", "tbn", 64, 0.8), _row("cnn/dirichlet/long", "tbn", 64, 0.78),
        _row("cnn/iid/long", "unmix_tns", 64, 0.4), _row("cnn/dirichlet/long", "unmix_tns", 64, 0.4),
        _row("cnn/iid/long", "source", 64, 0.45),
        _row("cnn/iid/long", "tent", 64, 0.85),
    ]  # fmt: skip
    lines = _tta_claims(rows)
    verdicts = [line.split("]")[0] + "]" for line in lines if line.startswith("[")]
    assert verdicts == ["[holds]", "[does NOT hold]", "[holds]", "[does NOT hold]", "[holds]"]
    assert any("note: UnMix-TNS stays below the source model" in line for line in lines)


def test_normonly_claim_verdicts():
    rows = [
        {"norm": "bn_only", "test_acc": 0.6, "status": "ok", "gamma_near_zero": 0.2},
        {"norm": "random_subset", "test_acc": 0.65, "status": "ok"},
        {"norm": "bn+head", "test_acc": 0.9, "status": "ok"},
        {"norm": "full", "test_acc": 0.99, "status": "ok", "gamma_near_zero": 0.0},
    ]
    lines = _normonly_claims(rows)
    assert [line.split("]")[0] + "]" for line in lines] == ["[holds]", "[does NOT hold]", "[holds]"]
    assert "160 of" in lines[0]
