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
        "tta",
        scale=TINY,
        seeds=1,
        norms=["source", "tbn", "alpha_bn", "unmix_tns"],
        out_dir=tmp_path,
        progress=False,
        threads=1,
        workers=1,
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
    assert "You et al. 2021 (α-BN, arXiv:2110.04065)" in out and "Tomar et al. 2024 (UnMix-TNS" in out


def test_normonly_suite_runs_at_tiny_scale(tmp_path, capsys):
    results = run("normonly", scale=TINY, seeds=1, out_dir=tmp_path, progress=False, threads=1, workers=1)
    assert [r["norm"] for r in results] == list(NORMONLY_VARIANTS)
    trainable = {r["norm"]: r["trainable_params"] for r in results}
    assert trainable["bn_only"] == 160 and trainable["full"] == results[0]["params"]
    assert all(r["status"] == "ok" and 0.0 <= r["gamma_near_zero"] <= 1.0 for r in results)
    assert "Frankle et al. 2021" in capsys.readouterr().out


def _rows(model, norm, bs, accs, **kw):
    return [
        {"task": "digits-C5", "model": model, "norm": norm, "batch_size": bs, "seed": s, "test_acc": a, "status": "ok", **kw}
        for s, a in enumerate(accs)
    ]


def test_tta_claim_verdicts():
    spec = [
        ("cnn/iid", "alpha_bn", 1, [0.5, 0.52, 0.51]), ("cnn/iid", "source", 1, [0.45, 0.46, 0.44]),
        ("cnn/iid", "tbn", 1, [0.1, 0.1, 0.1]),
        ("cnn/iid", "alpha_bn", 4, [0.5, 0.51, 0.5]), ("cnn/iid", "source", 4, [0.45, 0.46, 0.44]),
        ("cnn/iid", "tbn", 4, [0.7, 0.69, 0.71]),
        ("cnn/iid", "tbn", 64, [0.8, 0.8, 0.81]), ("cnn/dirichlet", "tbn", 64, [0.4, 0.42, 0.41]),
        ("cnn/iid", "unmix_tns", 64, [0.7, 0.71, 0.7]), ("cnn/dirichlet", "unmix_tns", 64, [0.69, 0.7, 0.69]),
        ("cnn/iid", "source", 64, [0.45, 0.46, 0.44]),
        ("cnn/iid/long", "tbn", 64, [0.8, 0.8, 0.8]), ("cnn/dirichlet/long", "tbn", 64, [0.78, 0.79, 0.77]),
        ("cnn/iid/long", "unmix_tns", 64, [0.4, 0.4, 0.4]), ("cnn/dirichlet/long", "unmix_tns", 64, [0.4, 0.4, 0.4]),
        ("cnn/iid/long", "tent", 64, [0.85, 0.84, 0.84]),
    ]  # fmt: skip
    rows = [r for m, n, bs, a in spec for r in _rows(m, n, bs, a)]
    labels = [line.split("]")[0][1:] for line in _tta_claims(rows) if line.startswith("[")]
    assert labels == ["supported", "contradicted", "supported", "contradicted", "supported"]


def test_normonly_claim_verdicts():
    rows = [
        *_rows("cnn", "bn_only", 64, [0.6, 0.62, 0.61], gamma_near_zero=0.2),
        *_rows("cnn", "random_subset", 64, [0.65, 0.66, 0.64]),
        *_rows("cnn", "bn+head", 64, [0.9, 0.9, 0.9]),
        *_rows("cnn", "full", 64, [0.99, 0.98, 0.99], gamma_near_zero=0.0),
    ]
    rows[1]["gamma_near_zero"] = 0.25  # a spread, so the interval has a width
    lines = _normonly_claims(rows)
    assert [line.split("]")[0][1:] for line in lines] == ["supported", "contradicted", "supported"]
    assert "160 of" in lines[0]
