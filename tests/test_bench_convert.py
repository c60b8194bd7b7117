"""Bench suite ``convert``: registered, runs at smoke scale, claim lines decided by the paired verdicts."""

from __future__ import annotations

import json
import math

import pytest

from normkit.bench import suites_convert as sc
from normkit.bench.suites import SUITES, SuiteConfig
from normkit.bench.verdict import label_of

pytest.importorskip("transformers")


def test_registered_with_one_job_per_claim():
    assert "convert" in SUITES and SUITES["convert"].seeds >= 3
    jobs = sc.convert(SuiteConfig())
    assert [j.task for j in jobs] == ["crms", "fold", "tune", "lnfree"]
    assert all(j.run is not None for j in jobs)


def test_suite_runs_end_to_end_at_smoke_scale(tmp_path):
    from normkit.bench import run

    rows = run("convert", out_dir=tmp_path, scale=0.03, seeds=2, progress=False, threads=1, workers=1)
    by_task = {}
    for r in rows:
        assert r["status"] == "ok", r.get("traceback", r["error"])
        by_task.setdefault(r["task"], []).append(r)
    assert sorted(by_task) == ["crms", "fold", "lnfree", "tune"] and all(len(v) == 2 for v in by_task.values())
    for r in by_task["lnfree"]:
        for key in ("val_loss_pretrained", "val_loss_baseline", "val_loss_lnfree", "val_loss_exported"):
            assert math.isfinite(r[key]) and r[key] < math.log(256)  # better than uniform bytes
        assert abs(r["val_loss_exported"] - r["val_loss_lnfree"]) < 1e-4 and r["export_rel_diff"] < 1e-5
        assert 0 < r["test_acc"] < 1  # next-byte accuracy
    assert all(r["test_acc"] == 1.0 for t in ("crms", "fold", "tune") for r in by_task[t])  # exact on every seed
    assert all(r["tune_saved_mb"] < r["eval_saved_mb"] for r in by_task["tune"])
    claims = json.loads((tmp_path / "results.json").read_text())["claims"]
    assert len(claims) == 7 and all(label_of(c) in ("supported", "contradicted", "inconclusive") for c in claims)
    assert [label_of(c) for c in claims if "≡" in c] == ["supported", "supported"]


def _lnfree_rows(diffs: list[float]) -> list[dict]:
    return [
        {"task": "lnfree", "status": "ok", "seed": i, "val_loss_baseline": 2.0, "val_loss_lnfree": 2.0 - d,
         "val_loss_pretrained": 2.5, "val_loss_exported": 2.0 - d, "export_rel_diff": 1e-7, "python": "3.x",
         "corpus_sha256": "abc"}
        for i, d in enumerate(diffs)
    ]  # fmt: skip


def test_claims_follow_the_paired_verdicts():
    # LN-free 0.02 nats worse on every seed (within the 0.1 margin): supported
    lines = sc._convert_claims(_lnfree_rows([-0.02, -0.03, -0.01]))
    lnfree = [ln for ln in lines if "LN removal" in ln]
    assert len(lnfree) == 1 and label_of(lnfree[0]) == "supported" and "nats" in lnfree[0]
    # 0.3 nats worse on every seed: contradicted
    assert (
        label_of([ln for ln in sc._convert_claims(_lnfree_rows([-0.3, -0.32, -0.29])) if "LN removal" in ln][0]) == "contradicted"
    )
    # jobs that did not run or failed are reported as not measured, never silently dropped
    failed = [{"task": "crms", "status": "error", "error": "ImportError: no crms"}]
    lines = sc._convert_claims(failed)
    assert len(lines) == 4 and all(label_of(ln) == "inconclusive" for ln in lines)
    assert "not measured (ImportError: no crms)" in lines[0]
    fold_rows = [{"task": "fold", "status": "ok", "max_abs_diff": 3e-7, "folded": 20.0, "eval_ms": 10.0, "folded_ms": f}
                 for f in (8.0, 8.5, 8.2)]  # fmt: skip
    fold_lines = [ln for ln in sc._convert_claims(fold_rows) if "folding" in ln.lower()]
    assert [label_of(ln) for ln in fold_lines] == ["supported", "supported"]
    fold_rows[0]["max_abs_diff"] = 1e-2  # one inexact seed contradicts exactness
    assert label_of([ln for ln in sc._convert_claims(fold_rows) if "folded model" in ln][0]) == "contradicted"
