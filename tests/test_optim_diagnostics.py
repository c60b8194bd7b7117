"""NormDiagnostics against plain formulas, and the BN MLP of Meterez et al. 2024 (arXiv:2310.02012)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.bn_mlp import BatchScaleNorm, bn_mlp
from normkit.optim.diagnostics import NormDiagnostics, angular_update, effective_lr, grad_norms_by_layer, plot_diagnostics


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.5}, {"params": list(model[1:].parameters()), "lr": 0.1}])
    return model, opt


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_values_match_plain_formulas() -> None:
    model, opt = _setup()
    w = model[0].weight
    with NormDiagnostics(model, opt, scale_invariant=[w]) as diag:
        before = w.detach().clone()
        _step(model, opt, 0)
        # the grad is still there after step: read it for the plain restatement
        grad = model[0].weight.grad.detach().clone()
    rows = diag.to_rows()
    r = next(r for r in rows if r["kind"] == "param" and r["name"] == "0.weight")
    after = w.detach()
    assert r["weight_norm"] == pytest.approx(float(torch.sqrt((after**2).sum())))
    assert r["effective_lr"] == pytest.approx(0.5 / float((after**2).sum()))
    b, a = before.double(), after.double()
    cos = float((b * a).sum() / (b.norm() * a.norm()))
    assert r["angular_update"] == pytest.approx(math.acos(cos), rel=1e-6)
    assert r["grad_norm"] == pytest.approx(float(grad.norm()))
    assert r["scale_invariant"] is True
    other = next(r for r in rows if r["kind"] == "param" and r["name"] == "3.weight")
    assert other["effective_lr"] is None and other["group"] == 1 and other["lr"] == 0.1
    grp = next(r for r in rows if r["kind"] == "group" and r["group"] == 1)
    ps = [p.detach() for p in model[1:].parameters()]
    assert grp["weight_norm"] == pytest.approx(math.sqrt(sum(float((p**2).sum()) for p in ps)))
    assert grp["params"] == 4
    norm_row = next(r for r in rows if r["kind"] == "norm")
    assert norm_row["name"] == "1" and norm_row["gamma_near_zero"] == 0.0
    assert norm_row["act_mean"] == pytest.approx(0.0, abs=1e-5)  # BN output at init (γ=1, β=0)
    assert norm_row["act_std"] == pytest.approx(1.0, abs=0.05)


def test_gamma_fraction_every_and_summary() -> None:
    model, opt = _setup()
    with torch.no_grad():
        model[1].weight[:3] = 1e-3
    diag = NormDiagnostics(model, opt, every=2)
    for s in range(5):
        _step(model, opt, s)
    diag.close()
    steps = sorted({r["step"] for r in diag.rows})
    assert steps == [0, 2, 4]
    assert next(r for r in diag.rows if r["kind"] == "norm")["gamma_near_zero"] == pytest.approx(3 / 8)
    summ = diag.summary()
    assert set(summ) == {n for n, _ in model.named_parameters()}
    assert summ["0.weight"]["first_effective_lr"] is None  # not declared scale-invariant
    assert summ["0.weight"]["last_weight_norm"] == pytest.approx(float(model[0].weight.detach().norm()))
    _step(model, opt, 9)  # hooks removed: nothing more recorded
    assert sorted({r["step"] for r in diag.rows}) == [0, 2, 4]


def test_helpers_and_example_input_tracing() -> None:
    assert effective_lr(0.2, torch.full((2, 2), 0.5)) == pytest.approx(0.2 / 1.0)
    assert angular_update(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(math.pi / 4)
    assert math.isnan(angular_update(torch.zeros(2), torch.ones(2)))
    model, opt = _setup()
    diag = NormDiagnostics(model, opt, example_input=torch.randn(16, 6))
    assert diag.scale_invariant == {id(model[0].weight)}
    diag.close()


def test_plot(tmp_path) -> None:
    model, opt = _setup()
    with NormDiagnostics(model, opt, scale_invariant=[model[0].weight]) as diag:
        for s in range(3):
            _step(model, opt, s)
    path = tmp_path / "diag.png"
    fig = plot_diagnostics(diag, path)
    assert path.exists() and len(fig.axes) == 4


def test_bad_arguments() -> None:
    model, opt = _setup()
    with pytest.raises(TypeError, match="Optimizer"):
        NormDiagnostics(model, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        NormDiagnostics(model, opt, every=0)
    with pytest.raises(ValueError, match="not parameters"):
        NormDiagnostics(model, opt, scale_invariant=[torch.ones(2)])
    with pytest.raises(ValueError, match="not both"):
        NormDiagnostics(model, opt, scale_invariant=[], example_input=torch.ones(2, 6))


def test_batch_scale_norm_is_the_papers_bn() -> None:
    x = torch.randn(10, 4, dtype=torch.float64)
    n = x.shape[0]
    torch.testing.assert_close(BatchScaleNorm()(x), x / (x.norm(dim=0, keepdim=True) / math.sqrt(n)))
    xc = x - x.mean(0, keepdim=True)
    torch.testing.assert_close(BatchScaleNorm(mean_reduction=True)(x), xc / (xc.norm(dim=0, keepdim=True) / math.sqrt(n)))
    with pytest.raises(ValueError, match="at least 2"):
        BatchScaleNorm()(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, features\)"):
        BatchScaleNorm()(torch.ones(2, 3, 4))


def test_bn_mlp_structure_and_orthogonal_init() -> None:
    torch.manual_seed(0)
    m = bn_mlp(12, 3, depth=4, width=12)
    lins = [l for l in m if isinstance(l, nn.Linear)]
    assert len(lins) == 5 and all(l.bias is None for l in lins)
    assert sum(isinstance(l, BatchScaleNorm) for l in m) == 4 and sum(isinstance(l, nn.Identity) for l in m) == 4
    w = lins[1].weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(12), atol=1e-5, rtol=0)
    torch_bn = bn_mlp(12, 3, depth=2, width=12, norm="torch", init="normal", activation=nn.Tanh)
    assert any(isinstance(l, nn.BatchNorm1d) for l in torch_bn) and any(isinstance(l, nn.Tanh) for l in torch_bn)
    with pytest.raises(ValueError, match="init"):
        bn_mlp(2, 2, depth=1, width=2, init="kaiming")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        bn_mlp(2, 2, depth=0, width=2)


def test_orthogonal_bn_mlp_gradients_stay_bounded_in_depth_gaussian_ones_grow() -> None:
    # the paper's check (official notebook): log ‖∂L/∂W_1‖ against depth, batch = width
    torch.manual_seed(0)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))

    def log_grad(init: str, depth: int) -> float:
        vals = []
        for seed in range(3):
            torch.manual_seed(seed)
            m = bn_mlp(32, 10, depth=depth, width=32, init=init)
            F.cross_entropy(m(x), y).backward()
            vals.append(math.log(grad_norms_by_layer(m)["4"]))
        return sum(vals) / len(vals)

    ortho = log_grad("orthogonal", 150) - log_grad("orthogonal", 5)
    normal = log_grad("normal", 150) - log_grad("normal", 5)
    assert abs(ortho) < 0.5
    assert normal > 1.0
