"""NaP (Lyle et al. 2024): norm insertion before non-linearities and projection to the initial norms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkit.optim.nap import NaP, nap_targets, normalize_and_project


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(opt, model: nn.Module, steps: int = 5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _norm(ts) -> float:
    return float(torch.sqrt(sum(t.detach().double().pow(2).sum() for t in ts)))


def test_inserts_a_norm_before_each_nonlinearity_where_missing() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(),  # gets GroupNorm(1 group)
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),  # already normalized: untouched
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.GELU(),  # gets LayerNorm
        nn.Linear(6, 2),
    )  # fmt: skip
    report = normalize_and_project(model)
    assert [name for name, *_ in report] == ["1", "7"]
    assert report.skipped == []
    conv_norm, lin_norm = model[1][0], model[7][0]
    assert isinstance(conv_norm, nn.GroupNorm) and conv_norm.num_groups == 1 and conv_norm.num_channels == 4
    assert isinstance(lin_norm, nn.LayerNorm) and tuple(lin_norm.normalized_shape) == (6,)
    assert isinstance(model[1][1], nn.ReLU) and isinstance(model[7][1], nn.GELU)
    assert isinstance(model[3], nn.BatchNorm2d) and isinstance(model[4], nn.ReLU)
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 2)


def test_pre_activations_are_normalized_after_insertion() -> None:
    model = _mlp()
    normalize_and_project(model)
    seen = []
    model[1][1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(torch.randn(5, 8) * 10 + 3)
    h = seen[0]  # input of the first ReLU: LayerNorm output with γ=1, β=0
    torch.testing.assert_close(h.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_skipped_activations_are_reported_and_inplace_false_keeps_the_original() -> None:
    shared = nn.ReLU()
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    report = normalize_and_project(model, inplace=False)
    assert report.model is not model and len(report) == 0
    assert report.skipped == ["0", "2", "4"]  # first in its block; one module at two places
    assert isinstance(model[2], nn.ReLU)


def test_custom_norm_factory() -> None:
    model = _mlp()
    normalize_and_project(model, norm=lambda c, layer: nn.RMSNorm(c))
    assert isinstance(model[1][0], nn.RMSNorm) and isinstance(model[3][0], nn.RMSNorm)


def test_targets_are_the_weights_feeding_norms_and_the_norm_affines() -> None:
    model = _mlp()
    normalize_and_project(model)
    weights, norms = nap_targets(model)
    assert [[id(p) for p in s] for s in weights] == [
        [id(model[0].weight), id(model[0].bias)],
        [id(model[2].weight), id(model[2].bias)],
    ]  # not the output layer model[4]: it feeds no norm
    assert [[id(p) for p in s] for s in norms] == [
        [id(model[1][0].weight), id(model[1][0].bias)],
        [id(model[3][0].weight), id(model[3][0].bias)],
    ]


@pytest.mark.parametrize("bias,affine", [("joint", "joint"), ("none", "none")])
def test_norms_stay_at_their_initial_values(bias: str, affine: str) -> None:
    model = _mlp()
    normalize_and_project(model)
    w0 = _norm([model[0].weight, model[0].bias]) if bias == "joint" else _norm([model[0].weight])
    g0 = _norm([model[1][0].weight, model[1][0].bias])
    opt = NaP(torch.optim.Adam(model.parameters(), lr=0.3), model, bias=bias, affine=affine)
    _train(opt, model, steps=8)
    w = _norm([model[0].weight, model[0].bias]) if bias == "joint" else _norm([model[0].weight])
    assert abs(w - w0) < 1e-6 * w0
    g = _norm([model[1][0].weight, model[1][0].bias])
    if affine == "joint":
        assert abs(g - g0) < 1e-6 * g0
    else:
        assert abs(g - g0) > 1e-3  # left free: Adam at lr 0.3 moves it


def test_one_step_equals_the_optimizer_step_then_the_plain_projection() -> None:
    model = _mlp()
    normalize_and_project(model)
    ref = copy.deepcopy(model)
    opt = NaP(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    init = {k: v.detach().clone() for k, v in ref.named_parameters()}
    for step in range(3):
        _train(opt, model, steps=1, seed=step)
        _train(ref_opt, ref, steps=1, seed=step)
        with torch.no_grad():  # W ← W·‖W₀‖/‖W‖ on (weight, bias) of layers 0, 2 and (γ, β) of both norms
            for prefix in ("0.", "1.0.", "2.", "3.0."):
                names = [n for n in init if n.startswith(prefix)]
                scale = _norm([init[n] for n in names]) / _norm([dict(ref.named_parameters())[n] for n in names])
                for n in names:
                    dict(ref.named_parameters())[n].mul_(scale)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_weight_projection_does_not_change_the_function() -> None:
    # (W, b) feeding a LayerNorm is scale-invariant, so projecting it leaves the outputs unchanged
    model = _mlp()
    normalize_and_project(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[0].bias.mul_(3.0)
        before = model(x)
    opt = NaP(torch.optim.SGD(model.parameters(), lr=0.1), groups=[[model[0].weight, model[0].bias]])
    opt.init_norms = [opt.init_norms[0] / 3.0]
    opt.project()
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    model = _mlp()
    normalize_and_project(model)
    opt = NaP(torch.optim.Adam(model.parameters(), lr=0.05), model)
    _train(opt, model, steps=3)
    twin = copy.deepcopy(model)
    twin_opt = NaP(torch.optim.Adam(twin.parameters(), lr=0.05), twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(opt, model, steps=3, seed=5)
    _train(twin_opt, twin, steps=3, seed=5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_bad_arguments() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        NaP(object(), model)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="bias must be"):
        NaP(opt, model, bias="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="affine must be"):
        NaP(opt, model, affine="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nothing to project"):
        NaP(opt, nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="nonzero initial norm"):
        NaP(opt, groups=[torch.zeros(3)])
    with pytest.raises(TypeError, match="nn.Module"):
        normalize_and_project("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="activations"):
        normalize_and_project(model, activations=["relu"])  # type: ignore[list-item]
    nap = NaP(opt, groups=[model[0].weight])
    with pytest.raises(ValueError, match="initial norms"):
        nap.load_state_dict({"optimizer": opt.state_dict(), "init_norms": [1.0, 2.0]})


def test_diagnostics_accept_nap_and_see_the_projected_weights():
    # NormDiagnostics hooks NaP's own step (Adam's step + projection), not the inner Adam's
    import torch
    from torch import nn

    from normkit.optim import NaP, NormDiagnostics, normalize_and_project

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    normalize_and_project(mlp)
    opt = NaP(torch.optim.Adam(mlp.parameters(), lr=0.1), mlp)
    w, b = mlp[0].weight, mlp[0].bias
    joint0 = torch.cat([w.detach().flatten(), b.detach()]).norm().item()
    with NormDiagnostics(mlp, opt, scale_invariant=[w]) as diag:
        for _ in range(3):
            loss = mlp(torch.randn(8, 6)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    rows = [r for r in diag.to_rows() if r["kind"] == "param" and r["name"] in ("0.weight", "0.bias")]
    assert len(rows) == 6
    for step in range(3):  # recorded after the projection: ||W||² + ||b||² is the initial joint norm²
        wn, bn = (r["weight_norm"] for r in rows if r["step"] == step)
        assert wn**2 + bn**2 == pytest.approx(joint0**2, rel=1e-6)
        assert next(r for r in rows if r["step"] == step and r["name"] == "0.weight")["effective_lr"] == pytest.approx(
            0.1 / wn**2
        )
    assert torch.cat([w.detach().flatten(), b.detach()]).norm().item() == pytest.approx(joint0, rel=1e-6)
    with pytest.raises(TypeError, match="expects a torch.optim.Optimizer"):
        NormDiagnostics(mlp, object())
