"""The literature suites (microbatch, transformer, selfnorm): jobs, tiny runs, claim verdicts."""

from __future__ import annotations

import pytest
import torch

from normkit.bench import SUITES, SuiteConfig, run
from normkit.bench.suites_zoo import MICROBATCH_NORMS, SELFNORM_MODELS, TRANSFORMER_NORMS, layer_statistics
from normkit.data import load_digits


def _row(norm: str, acc: float, **kw) -> dict:
    return {"norm": norm, "test_acc": acc, "status": "ok", **kw}


@pytest.mark.parametrize("suite", ["microbatch", "transformer", "selfnorm"])
def test_every_job_builds_and_runs_forward(suite):
    data = load_digits()
    for job in SUITES[suite].jobs(SuiteConfig()):
        model = job.build(job.norm)
        out = model.train()(data.x_train[:4])
        assert out.shape == (4, 10) and torch.isfinite(out).all(), job.key


def test_suite_norm_lists():
    assert {"batchnorm", "groupnorm+ws", "bcn+ws", "evonorm_s0", "evonorm_b0", "frn", "ibn"} <= set(MICROBATCH_NORMS)
    assert {"layernorm", "powernorm", "unifiednorm", "batchnorm", "repbn", "prepbn", "crmsnorm", "dyt",
            "layernorm_scaling"} <= set(TRANSFORMER_NORMS)  # fmt: skip
    assert set(SELFNORM_MODELS) == {"selu+lecun", "relu", "relu+bn"}


def test_tiny_microbatch_and_transformer_runs(tmp_path):
    rows = run("microbatch", scale=0.01, norms=["batchnorm", "groupnorm+ws"], out_dir=tmp_path / "m", progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 4
    rows = run("transformer", scale=0.01, norms=["powernorm", "batchnorm"], out_dir=tmp_path / "t", progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 2


def test_selfnorm_measures_every_layer_and_plots(tmp_path):
    rows = run("selfnorm", scale=0.02, norms=["selu+lecun"], out_dir=tmp_path, progress=False)
    assert all(len(r["layer_var"]) == 32 for r in rows)
    assert (tmp_path / "selfnorm_layers.png").exists()


def test_layer_statistics_matches_a_manual_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU()
    )
    data = load_digits()
    stats = layer_statistics(model, data)
    h1 = torch.relu(model[1](data.x_test.flatten(1)))
    h2 = torch.relu(model[3](h1))
    torch.testing.assert_close(torch.tensor(stats["layer_mean"]), torch.stack([h1.mean(), h2.mean()]).detach())
    torch.testing.assert_close(torch.tensor(stats["layer_var"]), torch.stack([h1.var(), h2.var()]).detach())


def test_microbatch_claim_verdicts():
    claims = SUITES["microbatch"].claims

    def rows(bn_small: float) -> list[dict]:
        out = [_row("batchnorm", 0.98, model="cnn", batch_size=64), _row("batchnorm", bn_small, model="cnn", batch_size=2)]
        for n in ("groupnorm+ws", "bcn+ws", "evonorm_s0"):
            out += [_row(n, 0.97, model="cnn", batch_size=64), _row(n, 0.96, model="cnn", batch_size=2)]
        return out

    assert claims(rows(0.80))[0].startswith("[holds]")
    assert claims(rows(0.98))[0].startswith("[does NOT hold]")
    assert claims([]) == []


def test_transformer_claim_verdicts():
    claims = SUITES["transformer"].claims
    base = {"layernorm": 0.95, "batchnorm": 0.90, "unifiednorm": 0.948, "prepbn": 0.90}
    lines = claims([_row(n, a, model="vit") for n, a in {**base, "powernorm": 0.96}.items()])
    assert lines[0].startswith("[holds] Shen") and lines[1].startswith("[holds] Yang")
    assert lines[2].startswith("[does NOT hold] Guo")
    lines = claims([_row(n, a, model="vit") for n, a in {**base, "powernorm": 0.85}.items()])
    assert lines[0].startswith("[does NOT hold] Shen")


def test_selfnorm_claim_uses_best_learning_rate():
    claims = SUITES["selfnorm"].claims
    stats = {"layer_mean": [0.01] * 32, "layer_var": [1.0] * 32}
    results = [
        _row("selu+lecun", 0.95, lr=1e-3, **stats), _row("selu+lecun", 0.50, lr=1e-2, **stats),
        _row("relu+bn", 0.20, lr=1e-3), _row("relu+bn", 0.94, lr=1e-2),
        _row("relu", 0.10, lr=1e-3), _row("relu", 0.10, lr=1e-2),
    ]  # fmt: skip
    lines = claims(results)
    assert lines[0].startswith("[holds]") and "selu+lecun 95.0% (lr 0.001)" in lines[0]
    assert lines[1].startswith("[holds]") and "after training" in lines[1]  # the init check is measured, not given
    results[0]["test_acc"] = 0.5
    assert claims(results)[0].startswith("[does NOT hold]")
