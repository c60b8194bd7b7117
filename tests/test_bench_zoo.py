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
    for job in SUITES[suite].jobs(SuiteConfig()):
        model = job.build(job.norm).train()
        if job.task == "text":  # the byte LM: ids and a padding mask
            ids = torch.randint(1, 256, (3, 9))
            valid = torch.ones(3, 9, dtype=torch.bool)
            valid[0, 5:] = False
            out = model(ids, valid)
            assert out.shape == (3, 9, 256) and torch.isfinite(out).all(), job.key
            continue
        x = job.data().x_train[:4]
        out = model(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all(), job.key


def test_lm_batch_norms_ignore_padding():
    """A padded position's value must not change the real tokens' outputs of a BN LM (the mask reaches BN)."""
    from normkit.bench.suites_zoo import TRANSFORMER_NORMS

    for label in ("batchnorm", "powernorm", "unifiednorm", "repbn"):
        torch.manual_seed(0)
        model = TRANSFORMER_NORMS[label](label).train()
        ids = torch.randint(1, 256, (4, 10))
        valid = torch.ones(4, 10, dtype=torch.bool)
        valid[1, 6:] = False
        other = ids.clone()
        other[1, 6:] = 7
        state = {k: v.clone() for k, v in model.state_dict().items()}
        a = model(ids, valid)
        model.load_state_dict(state)
        b = model(other, valid)
        torch.testing.assert_close(a[valid], b[valid], msg=label)


def test_suite_norm_lists():
    assert {"batchnorm", "groupnorm+ws", "bcn+ws", "evonorm_s0", "evonorm_b0", "frn", "ibn"} <= set(MICROBATCH_NORMS)
    assert {"layernorm", "powernorm", "unifiednorm", "batchnorm", "repbn", "prepbn", "crmsnorm", "dyt",
            "layernorm_scaling"} <= set(TRANSFORMER_NORMS)  # fmt: skip
    assert set(SELFNORM_MODELS) == {"selu+lecun", "relu", "relu+bn"}
    # The microbatch suite trains BN and every norm with a micro-batch claim (the rest are left out for time).
    from normkit.bench.suites_zoo import MICROBATCH_CLAIMS, MICROBATCH_RUN

    run_norms = {j.norm for j in SUITES["microbatch"].jobs(SuiteConfig(full=True))}
    assert run_norms == set(MICROBATCH_RUN) == {"batchnorm", *MICROBATCH_CLAIMS} and run_norms <= set(MICROBATCH_NORMS)


def test_microbatch_bcn_uses_its_micro_batch_form_at_batch_2():
    """Qiao et al. train BCN at 1–2 images per GPU with estimated statistics (EstBN) in the BN stage: the batch-2
    job builds that form, the batch-64 job the batch-statistics BN; every other norm is the same at both sizes."""
    from normkit.nn.batch_channel_norm import BatchChannelNorm, EstBN
    from normkit.nn.batch_norm import BatchNorm

    jobs = {(j.norm, j.batch_size): j for j in SUITES["microbatch"].jobs(SuiteConfig(full=True))}
    bcns = {bs: [m for m in jobs["bcn+ws", bs].build("bcn+ws").modules() if isinstance(m, BatchChannelNorm)]
            for bs in (64, 2)}  # fmt: skip
    assert bcns[64] and all(isinstance(m.pbn, BatchNorm) and not m.estimate for m in bcns[64])
    assert bcns[2] and all(isinstance(m.pbn, EstBN) and m.estimate for m in bcns[2])
    for norm in ("batchnorm", "groupnorm", "groupnorm+ws", "evonorm_s0"):
        big, small = jobs[norm, 64].build(norm), jobs[norm, 2].build(norm)
        assert [type(m) for m in big.modules()] == [type(m) for m in small.modules()]


@pytest.mark.slow
def test_tiny_microbatch_runs(tmp_path):
    rows = run("microbatch", scale=0.002, seeds=1, norms=["batchnorm", "groupnorm+ws"], out_dir=tmp_path / "m",
               progress=False, workers=1)  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * 4 and {r["task"] for r in rows} == {"scenes"}
    assert sorted(r["batch_size"] for r in rows) == [2, 2, 64, 64]


def test_scene_cnn_is_deterministic_and_max_pools():
    """Same seed → same weights and logits; the head reads each channel's maximum over the final 4×4 map."""
    from normkit.bench.models_tasks import SceneCNN

    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(5)
    a = SceneCNN("groupnorm").eval()
    torch.manual_seed(5)
    b = SceneCNN("groupnorm").eval()
    assert torch.equal(a(x), b(x))
    feats = a.features(x)
    assert feats.shape == (3, 64, 4, 4)  # three 2×2 max-pools: 32 → 4
    top = torch.stack([feats[n, c].max() for n in range(3) for c in range(64)]).reshape(3, 64)
    torch.testing.assert_close(a(x), top @ a.head.weight.T + a.head.bias)


def test_foreach_adamw_matches_the_per_tensor_loop():
    """train._optimizer's ``foreach=True`` is a speed-up only: the same parameters, bit for bit, after 20 steps."""
    from normkit.bench.models_tasks import SceneCNN
    from normkit.bench.suites import Job
    from normkit.bench.train import _optimizer

    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    params = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = SceneCNN("batchnorm")
        opt = _optimizer(model, Job("scenes", "cnn", "batchnorm", SceneCNN, 2, 1.0, 1e-3, weight_decay=0.01))
        if not foreach:
            for group in opt.param_groups:
                group["foreach"] = False
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        params.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*params, strict=True))


def test_tiny_transformer_runs(tmp_path, capsys):
    rows = run("transformer", scale=0.01, seeds=1, norms=["powernorm", "layernorm"], out_dir=tmp_path / "t",
               progress=False, workers=1)  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * 2
    assert all(r["test_loss"] > 0 and len(r["loss_curve"]) == r["steps"] for r in rows)
    assert "Shen et al. 2020 (PowerNorm" in capsys.readouterr().out
    assert (tmp_path / "t" / "curves.png").exists()


def test_selfnorm_measures_every_layer_and_plots(tmp_path):
    rows = run("selfnorm", scale=0.02, seeds=1, norms=["selu+lecun"], out_dir=tmp_path, progress=False, workers=1)
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


def _lm_rows(bpb: dict[str, list[float]]) -> list[dict]:
    return [
        {"task": "text", "model": "lm", "norm": n, "test_loss": v, "test_acc": 0.5, "status": "ok", "seed": s}
        for n, vs in bpb.items()
        for s, v in enumerate(vs)
    ]


def test_transformer_claim_verdicts_on_bits_per_byte():
    claims = SUITES["transformer"].claims  # lower bits per byte is better
    base = {"layernorm": [2.00, 2.01, 1.99], "batchnorm": [2.10, 2.12, 2.11], "unifiednorm": [2.001, 2.012, 1.992],
            "prepbn": [2.10, 2.11, 2.13]}  # fmt: skip
    lines = claims(_lm_rows({**base, "powernorm": [1.98, 1.99, 1.97]}))
    assert [line.split("]")[0][1:] for line in lines] == ["supported", "supported", "supported", "supported", "contradicted"]
    assert lines[3].startswith("[supported] Yang") and lines[4].startswith("[contradicted] Guo")
    assert "within 0.02 bits/byte" in lines[3] and "+0.110 bpb" in lines[0]
    lines = claims(_lm_rows({**base, "powernorm": [2.2, 2.21, 2.19]}))
    assert lines[2].startswith("[contradicted] Shen") and "at least as good as LN" in lines[2]


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


def test_sequence_suite_runs_on_mnist1d_at_tiny_scale(tmp_path):
    from normkit.bench.suites_zoo import SEQUENCE_CNN_NORMS, SEQUENCE_TRANSFORMER_NORMS

    jobs = list(SUITES["sequence"].jobs(SuiteConfig()))
    assert {(j.model, j.norm) for j in jobs} == {("cnn1d", n) for n in SEQUENCE_CNN_NORMS} | {
        ("transformer", n) for n in SEQUENCE_TRANSFORMER_NORMS
    }
    assert {(j.task, j.batch_size, j.lr) for j in jobs} == {("mnist1d", 64, 3e-3)}  # one recipe for every claim
    rows = run("sequence", scale=0.005, seeds=2, norms=["batchnorm", "ln", "layernorm", "dyt"], out_dir=tmp_path, progress=False,
               workers=1)  # fmt: skip
    assert all(r["status"] == "ok" and 0 <= r["test_acc"] <= 1 for r in rows), [r["error"] for r in rows]
    claims = SUITES["sequence"].claims(rows)
    assert any("LN is worse than BN in CNNs" in c for c in claims) and any("DyT matches LN" in c for c in claims)
    assert all(c.split("]")[0][1:] in ("supported", "contradicted", "inconclusive") and "2 seeds" in c for c in claims)


def test_norm_schedules_are_fractions_of_the_run():
    """PRepBN's LN → RepBN transition, PowerNorm's and UN's warm-ups follow the run the model is built for."""
    from normkit.bench.models import DEFAULT_RUN, current_run, make_norm, run_length

    assert current_run() == DEFAULT_RUN
    for steps, warmup in ((300, 30), (3000, 300)):
        with run_length(steps, warmup):
            assert make_norm("prepbn", 16).total_step == round(steps * 60_000 / 375_000)  # 16% as the official slab_deit
            assert make_norm("powernorm", 16).warmup_iters == warmup  # the lr warm-up, as the official NormSelect
            assert make_norm("unifiednorm", 16).warmup_iters == round(steps * 4_000 / 100_000)  # IWSLT14 recipe
    assert current_run() == DEFAULT_RUN
    with pytest.raises(ValueError, match="steps >= 1"):
        with run_length(0, 0):
            pass
