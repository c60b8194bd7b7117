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


def _seeded(norm: str, accs: list[float], **kw) -> list[dict]:
    return [{"task": "digits", "norm": norm, "test_acc": a, "status": "ok", "seed": s, **kw} for s, a in enumerate(accs)]


def test_microbatch_claim_verdicts():
    claims = SUITES["microbatch"].claims

    def rows(bn_small: list[float]) -> list[dict]:
        out = _seeded("batchnorm", [0.98, 0.97, 0.985], model="cnn", batch_size=64)
        out += _seeded("batchnorm", bn_small, model="cnn", batch_size=2)
        for n in ("groupnorm+ws", "bcn+ws", "evonorm_s0"):
            out += _seeded(n, [0.97, 0.96, 0.97], model="cnn", batch_size=64)
            out += _seeded(n, [0.96, 0.955, 0.96], model="cnn", batch_size=2)
        return out

    lines = claims(rows([0.80, 0.82, 0.79]))
    assert len(lines) == 3 and all(line.startswith("[supported]") for line in lines)
    assert "GN+WS" in lines[0] and "BCN+WS" in lines[1] and "EvoNorm-S0" in lines[2]
    assert all(line.startswith("[contradicted]") for line in claims(rows([0.98, 0.97, 0.985])))
    assert claims([]) == []


def test_transformer_claim_verdicts():
    claims = SUITES["transformer"].claims
    base = {"layernorm": [0.95, 0.94, 0.96], "batchnorm": [0.90, 0.89, 0.91], "unifiednorm": [0.948, 0.942, 0.957],
            "prepbn": [0.90, 0.88, 0.91]}  # fmt: skip
    rows = [r for n, a in {**base, "powernorm": [0.96, 0.95, 0.97]}.items() for r in _seeded(n, a, model="vit")]
    lines = claims(rows)
    assert [line.split("]")[0][1:] for line in lines] == ["supported", "supported", "supported", "supported", "contradicted"]
    assert lines[3].startswith("[supported] Yang") and lines[4].startswith("[contradicted] Guo")
    rows = [r for n, a in {**base, "powernorm": [0.85, 0.86, 0.84]}.items() for r in _seeded(n, a, model="vit")]
    assert claims(rows)[2].startswith("[contradicted] Shen") and "at least as good as LN" in claims(rows)[2]


def test_selfnorm_claim_uses_best_learning_rate():
    claims = SUITES["selfnorm"].claims
    stats = {"layer_mean": [0.01] * 32, "layer_var": [1.0] * 32}
    results = [
        *_seeded("selu+lecun", [0.95, 0.94], lr=1e-3, **stats), *_seeded("selu+lecun", [0.50, 0.5], lr=1e-2, **stats),
        *_seeded("relu+bn", [0.2, 0.2], lr=1e-3), *_seeded("relu+bn", [0.94, 0.93], lr=1e-2),
        *_seeded("relu", [0.1, 0.1], lr=1e-3), *_seeded("relu", [0.1, 0.11], lr=1e-2),
    ]  # fmt: skip
    lines = claims(results)
    assert lines[0].startswith("[supported]") and "selu+lecun 94.5% (lr 0.001)" in lines[0]
    assert lines[1].startswith("[supported]") and "2/2 seeds" in lines[1]  # the init check is measured on fresh nets
    for r in results[:2]:
        r["test_acc"] = 0.5
    assert claims(results)[0].startswith("[contradicted]")
