"""Tests of ``normkit bench``: tiny training scales so the whole file runs in seconds."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
from torch import Tensor, nn

import normkit
from normkit.bench import SUITES, Job, SuiteConfig, configure_parser, register_suite, run, run_cli
from normkit.bench.models import SmallCNN, TinyViT
from normkit.bench.suites import QUICK_EPOCHS, QUICK_IMAGE_NORMS, QUICK_TOKEN_NORMS, digits_jobs, norms_with_layout

TINY = 0.02  # fraction of the quick suite's training: a few steps per run


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def temp_suite():
    """Register suites under unique names and remove them afterwards (SUITES is global)."""
    added: list[str] = []

    def register(name: str, jobs: list[Job], **kwargs):
        register_suite(name, **kwargs)(lambda cfg: jobs)
        added.append(name)
        return name

    yield register
    for name in added:
        SUITES.pop(name, None)


@pytest.mark.slow
def test_quick_suite_writes_one_row_per_run(tmp_path, capsys):
    results = run("quick", scale=TINY / 2, seeds=1, norms=["batchnorm", "layernorm"], out_dir=tmp_path, progress=False, workers=1)

    # batchnorm is an image norm (digits CNN at batch 64 and 2), layernorm a token norm (tiny ViT).
    got = sorted((r["task"], r["model"], r["norm"], r["batch_size"]) for r in results)
    assert got == [("digits", "cnn", "batchnorm", 2), ("digits", "cnn", "batchnorm", 64), ("digits", "vit", "layernorm", 64)]
    for r in results:
        assert r["status"] == "ok", r["error"]
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["steps"] >= 1 and r["ms_per_step"] > 0 and r["train_loss"] > 0
    # scale shrinks training: QUICK_EPOCHS x 0.01 of 22 steps/epoch at batch 64 (1438 training digits), at least 1
    cnn64 = next(r for r in results if r["batch_size"] == 64 and r["model"] == "cnn")
    assert cnn64["steps"] == max(1, round(QUICK_EPOCHS[0] * TINY / 2 * 22))
    cnn2 = next(r for r in results if r["batch_size"] == 2)
    assert cnn2["steps"] == round(QUICK_EPOCHS[0] * TINY / 2 * 719)

    rows = _csv_rows(tmp_path / "results.csv")
    assert len(rows) == len(results) == 3
    assert {row["norm"] for row in rows} == {"batchnorm", "layernorm"}
    assert all(0.0 <= float(row["test_acc"]) <= 1.0 and row["status"] == "ok" for row in rows)

    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["env"]["suite"] == "quick" and payload["env"]["full"] is False
    assert payload["env"]["torch"] and payload["env"]["threads"] >= 1 and payload["env"]["total_time_s"] > 0
    assert len(payload["runs"]) == 3 and len(payload["leaderboard"]) == 3
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = capsys.readouterr().out
    assert "batchnorm" in out and "layernorm" in out and "results.csv" in out


@pytest.mark.slow
def test_runs_are_deterministic(tmp_path):
    a = run("quick", scale=0.01, seeds=1, norms=["rmsnorm"], out_dir=tmp_path / "a", progress=False, workers=1)
    b = run("quick", scale=0.01, seeds=1, norms=["rmsnorm"], out_dir=tmp_path / "b", progress=False, workers=1)
    assert [(r["test_acc"], r["train_loss"]) for r in a] == [(r["test_acc"], r["train_loss"]) for r in b]


def test_unknown_suite_lists_valid_names(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown suite 'nope'.*quick"):
        run("nope", out_dir=tmp_path)
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run_cli(parser.parse_args(["--suite", "nope", "--out", str(tmp_path)])) == 2
    assert "quick" in capsys.readouterr().err
    assert run_cli(parser.parse_args(["--list-suites"])) == 0
    assert "quick" in capsys.readouterr().out


def test_norm_filter_rejects_names_outside_the_suite(tmp_path):
    with pytest.raises(ValueError, match="not-a-norm"):
        run("quick", norms=["not-a-norm"], out_dir=tmp_path, scale=TINY)


def test_quick_suite_selects_core_norms_by_layout():
    image, token = norms_with_layout("channels_first"), norms_with_layout("channels_last")
    assert {"batchnorm", "groupnorm", "instancenorm"} <= set(image) and "layernorm" not in image
    assert {"layernorm", "rmsnorm", "dyt"} <= set(token) and "batchnorm" not in token
    assert all(normkit.norm_info(n).drop_in for n in image + token)
    jobs = list(SUITES["quick"].jobs(SuiteConfig()))
    cnn = {(j.task, j.norm, j.batch_size) for j in jobs if j.model == "cnn"}
    assert cnn == {("digits", n, bs) for n in QUICK_IMAGE_NORMS for bs in (64, 2)}
    assert {(j.task, j.norm) for j in jobs if j.model == "vit"} == {("digits", n) for n in QUICK_TOKEN_NORMS}
    # An explicit list overrides the registry (and is still filtered by layout).
    explicit = digits_jobs(SuiteConfig(), image_norms=["groupnorm", "layernorm"], token_norms=["dyt"])
    assert {(j.model, j.norm) for j in explicit} == {("cnn", "groupnorm"), ("vit", "dyt")}


@pytest.mark.slow
def test_registered_suite_runs_with_claims(tmp_path, temp_suite, capsys):
    seen: list[int] = []

    def claims(results):
        seen.append(len(results))
        return [f"test claim: {len(results)} runs"]

    jobs = [Job("toy", "vit", "scalenorm", TinyViT, 64, 0.5, 1e-2)]
    name = temp_suite("test-toy", jobs, description="toy", claims=claims, full_seeds=2)
    assert SUITES[name].description == "toy"
    with pytest.raises(ValueError, match="already registered"):
        register_suite(name)(lambda cfg: jobs)

    results = run(name, full=True, seed=5, out_dir=tmp_path, progress=False, workers=1)
    assert [r["seed"] for r in results] == [5, 6]  # full: one run per seed
    assert seen == [2]
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["claims"] == ["test claim: 2 runs"]
    assert payload["leaderboard"][0]["seeds"] == [5, 6]
    assert "test claim: 2 runs" in capsys.readouterr().out


class _Exploding(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom in forward")


def test_failing_norm_is_recorded_and_bench_continues(tmp_path, temp_suite, capsys):
    jobs = [
        Job("toy", "cnn", "no-such-norm", SmallCNN, 64, 0.2, 1e-2),  # create_norm raises
        Job("toy", "broken", "layernorm", _Exploding, 64, 0.2, 1e-2),  # training raises
        Job("toy", "cnn", "groupnorm", SmallCNN, 64, 0.2, 1e-2),
    ]
    name = temp_suite("test-failing", jobs)
    results = run(name, out_dir=tmp_path, progress=False, seeds=1)

    assert [r["status"] for r in results] == ["error", "error", "ok"]
    assert "no-such-norm" in results[0]["error"] and results[0]["error"].startswith("ValueError")
    assert results[1]["error"] == "RuntimeError: boom in forward"
    assert 0.0 <= results[2]["test_acc"] <= 1.0
    rows = _csv_rows(tmp_path / "results.csv")
    assert [row["status"] for row in rows] == ["error", "error", "ok"]
    assert "boom in forward" in capsys.readouterr().out  # shown in the leaderboard

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--suite", name, "--out", str(tmp_path / "cli"), "--no-progress", "--seeds", "1"])
    assert run_cli(args) == 1  # some runs failed


def _rows(values: dict[tuple[str, int], list[float]]) -> list[dict]:
    """Result rows, one per seed, for (norm, batch size) → per-seed accuracies."""
    return [
        {"task": "digits", "model": "cnn", "norm": norm, "batch_size": bs, "seed": s, "test_acc": acc, "status": "ok"}
        for (norm, bs), accs in values.items()
        for s, acc in enumerate(accs)
    ]


def test_quick_claim_is_a_paired_verdict_on_both_parts():
    claims = SUITES["quick"].claims
    gn = {("groupnorm", 64): [0.97, 0.96, 0.97], ("groupnorm", 2): [0.96, 0.96, 0.955]}
    bn_drops = {("batchnorm", 64): [0.98, 0.97, 0.985], ("batchnorm", 2): [0.80, 0.82, 0.79], **gn}
    line = claims(_rows(bn_drops))[0]
    assert line.startswith("[supported] Wu & He 2018 (GroupNorm)") and "3 seeds" in line and "paper: ImageNet" in line
    gn_drops = {**bn_drops, ("batchnorm", 2): [0.98, 0.97, 0.985], ("groupnorm", 2): [0.90, 0.88, 0.89]}
    assert claims(_rows(gn_drops))[0].startswith("[contradicted]")
    # BN gets *better* at batch 2 (and GN even more): the old check said "holds"; BN does not degrade.
    both_improve = {("batchnorm", 64): [0.45, 0.46, 0.44], ("batchnorm", 2): [0.70, 0.71, 0.69],
                    ("groupnorm", 64): [0.08, 0.07, 0.09], ("groupnorm", 2): [0.67, 0.66, 0.68]}  # fmt: skip
    line = claims(_rows(both_improve))[0]
    assert line.startswith("[contradicted]") and "BN drop -25.0 pt" in line
    one_seed = {k: v[:1] for k, v in bn_drops.items()}
    assert claims(_rows(one_seed))[0].startswith("[inconclusive]")
    noisy = {("batchnorm", 64): [0.98, 0.90, 0.99], ("batchnorm", 2): [0.97, 0.97, 0.90], **gn}
    assert claims(_rows(noisy))[0].startswith("[inconclusive]")
    assert claims(_rows({k: v for k, v in bn_drops.items() if k[0] == "batchnorm"}))[0].startswith("[inconclusive]")


def test_seeds_option(tmp_path):
    with pytest.raises(ValueError, match="seeds must be an int >= 1"):
        run("quick", seeds=0, out_dir=tmp_path)


@pytest.mark.slow
def test_parallel_workers_give_the_sequential_results(tmp_path):
    kwargs = {"scale": 0.01, "seeds": 1, "norms": ["bn_only", "full"], "progress": False, "threads": 1}  # 2 runs, 2 workers
    seq = run("normonly", out_dir=tmp_path / "seq", workers=1, **kwargs)
    par = run("normonly", out_dir=tmp_path / "par", workers=2, **kwargs)
    key = [(r["norm"], r["seed"], r["status"], r["test_acc"], r["train_loss"]) for r in seq]
    assert key == [(r["norm"], r["seed"], r["status"], r["test_acc"], r["train_loss"]) for r in par]


def test_text_progress_prints_the_remaining_time(capsys):
    from normkit.bench.runner import _TextProgress

    bar = _TextProgress(total_steps=100)
    bar.advance(25)
    bar.finish(0, 4, "toy", {"status": "error", "error": "x"})
    line = capsys.readouterr().out
    assert line.startswith("[1/4] toy: ERROR x") and "25% of steps" in line and "s left]" in line
    # a job's own run function may leave fields out (the convert suite has no training loss): "-", no crash
    row = {"status": "ok", "error": "", "test_acc": 1.0, "train_loss": None, "ms_per_step": None, "train_time_s": 2.0}
    bar.finish(1, 4, "convert", row)
    assert capsys.readouterr().out.startswith("[2/4] convert: acc 100.0%  loss -  - ms/step  (2.0s)")


def test_parallelism_defaults_to_one_worker_per_core(monkeypatch):
    from normkit.bench.runner import resolve_parallelism

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_parallelism(None, None) == (2, 1)  # 2 workers × 1 thread on 2 cores
    assert resolve_parallelism(None, None, runs=1) == (1, 1)  # never more workers than runs
    assert resolve_parallelism(None, None, max_workers=1) == (1, 2)  # timing suites: one process, both cores
    assert resolve_parallelism(1, None) == (1, 2) and resolve_parallelism(None, 2) == (1, 2)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert resolve_parallelism(None, None) == (1, 1)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        resolve_parallelism(0, None)
    assert SUITES["convert"].max_workers == 1  # its claims are wall-clock speedups


def test_cpu_summary_estimates_the_idle_wall_time():
    from normkit.bench.runner import cpu_summary

    rows = [{"worker": 1, "worker_cpu_s": 10.0}, {"worker": 1, "worker_cpu_s": 30.0}, {"worker": 2, "worker_cpu_s": 20.0}]
    # total = parent 2 + 30 + 20; the busiest worker (30) exceeds the balanced 52 / 2 = 26
    assert cpu_summary(rows, 2.0, workers=2) == {"cpu_s": 52.0, "cpu_busiest_s": 30.0, "idle_estimate_s": 30.0}
    assert cpu_summary([], 5.0, workers=1) == {"cpu_s": 5.0, "cpu_busiest_s": 5.0, "idle_estimate_s": 5.0}
