"""Width scaling of AdamW's lr and weight decay (Fan et al. 2025, arXiv:2510.15262): η₂ ∝ 1/d, λ₂ ∝ √d, λ₁ = 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normkit.optim.scaling import top_singular_values, width_scaled_param_groups, width_scaling


def _model(d: int) -> nn.Module:
    return nn.Sequential(nn.Embedding(10, d), nn.Linear(d, 4 * d), nn.LayerNorm(4 * d), nn.Linear(4 * d, d, bias=False))


def test_factors_restate_the_rule() -> None:
    f = width_scaling(256, 1024)
    assert f["matrix"] == pytest.approx((256 / 1024, math.sqrt(1024 / 256)))
    assert f["vector"] == (1.0, 0.0)
    # the steady-state top singular value √(η/λ)·d^0.75 is the same at both widths
    eta0, lam0 = 3e-3, 0.1
    eta, lam = eta0 * f["matrix"][0], lam0 * f["matrix"][1]
    assert math.sqrt(eta / lam) * 1024**0.75 == pytest.approx(math.sqrt(eta0 / lam0) * 256**0.75)


def test_param_groups() -> None:
    m = _model(64)
    groups = {
        g["name"]: g for g in width_scaled_param_groups(m, base_width=16, width=64, lr=1e-2, weight_decay=0.1, vector_lr=3e-3)
    }
    assert {id(p) for p in groups["matrix"]["params"]} == {id(m[1].weight), id(m[3].weight)}
    assert {id(p) for p in groups["vector"]["params"]} == {id(m[0].weight), id(m[1].bias), id(m[2].weight), id(m[2].bias)}
    assert groups["matrix"]["lr"] == pytest.approx(1e-2 * 16 / 64)
    assert groups["matrix"]["weight_decay"] == pytest.approx(0.1 * 2.0)
    assert groups["vector"]["lr"] == pytest.approx(3e-3) and groups["vector"]["weight_decay"] == 0.0
    torch.optim.AdamW(list(groups.values()))  # usable as given


def test_same_width_keeps_the_proxy_values_and_custom_classifier() -> None:
    m = _model(8)
    groups = width_scaled_param_groups(
        m, base_width=8, width=8, lr=1e-3, weight_decay=0.05, is_matrix=lambda n, p, o: n.startswith("1.")
    )
    mat = next(g for g in groups if g["name"] == "matrix")
    assert mat["lr"] == pytest.approx(1e-3) and mat["weight_decay"] == pytest.approx(0.05)
    assert {id(p) for p in mat["params"]} == {id(m[1].weight), id(m[1].bias)}


def test_top_singular_values() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    conv = nn.Conv2d(2, 4, 3)
    got = top_singular_values(nn.ModuleDict({"a": lin, "b": conv}))
    assert set(got) == {"a.weight", "b.weight"}
    assert got["a.weight"] == pytest.approx(float(torch.linalg.svdvals(lin.weight.detach())[0]), rel=1e-5)
    assert got["b.weight"] == pytest.approx(float(torch.linalg.svdvals(conv.weight.detach().reshape(4, -1))[0]), rel=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="base_width"):
        width_scaling(0, 8)
    with pytest.raises(ValueError, match="width"):
        width_scaling(8, -1)
    with pytest.raises(ValueError, match="lr"):
        width_scaled_param_groups(_model(4), base_width=4, width=8, lr=-1.0, weight_decay=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        width_scaled_param_groups([], base_width=4, width=8, lr=1.0, weight_decay=0.1)  # type: ignore[arg-type]
