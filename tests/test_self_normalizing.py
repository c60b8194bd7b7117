"""Self-normalizing networks: LeCun-normal init, the SELU MLP builder and the (0, 1) fixed point."""

import math

import pytest
import torch

from normkit.models.self_normalizing import (
    SELU_ALPHA,
    SELU_SCALE,
    activation_moments,
    self_normalizing_mlp,
    selu_fixed_point,
)
from normkit.nn.init import lecun_normal_


def test_lecun_normal_std_is_one_over_sqrt_fan_in():
    g = torch.Generator().manual_seed(0)
    w = torch.empty(400, 250)
    assert lecun_normal_(w, generator=g) is w
    assert w.mean().abs() < 0.01
    assert w.std().item() == pytest.approx(1 / math.sqrt(250), rel=0.02)
    wc = lecun_normal_(torch.empty(64, 8, 3, 3), generator=g)  # fan-in = 8·3·3
    assert wc.std().item() == pytest.approx(1 / math.sqrt(72), rel=0.03)
    # same distribution as torch's kaiming_normal_(fan_in, linear) with the same generator
    a = lecun_normal_(torch.empty(30, 20), generator=torch.Generator().manual_seed(1))
    b = torch.nn.init.kaiming_normal_(
        torch.empty(30, 20), mode="fan_in", nonlinearity="linear", generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a, b)


def test_lecun_normal_errors():
    with pytest.raises(ValueError, match="at least 2 dims"):
        lecun_normal_(torch.empty(5))
    with pytest.raises(TypeError, match="floating-point"):
        lecun_normal_(torch.empty(3, 3, dtype=torch.long))


def test_selu_is_the_official_function():
    assert SELU_ALPHA == pytest.approx(1.6732632423543772)
    assert SELU_SCALE == pytest.approx(1.0507009873554805)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    ref = SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * (torch.exp(x) - 1))
    torch.testing.assert_close(torch.nn.SELU()(x), ref)


def test_mlp_structure_and_init():
    torch.manual_seed(0)
    m = self_normalizing_mlp(20, 3, depth=4, width=300, dropout=0.05)
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Linear", "SELU", "AlphaDropout"] * 4 + ["Linear"]
    lins = [x for x in m if isinstance(x, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in lins] == [(20, 300), (300, 300), (300, 300), (300, 300), (300, 3)]
    for lin in lins:
        assert torch.all(lin.bias == 0)
    assert lins[1].weight.std().item() == pytest.approx(1 / math.sqrt(300), rel=0.02)
    assert all(x.p == 0.05 for x in m if isinstance(x, torch.nn.AlphaDropout))
    assert [type(x).__name__ for x in self_normalizing_mlp(5, 2, 2, 8)] == ["Linear", "SELU"] * 2 + ["Linear"]
    assert self_normalizing_mlp(5, 2, 0, 8)[0].in_features == 5
    assert m(torch.randn(7, 20)).shape == (7, 3)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_fixed_point_holds_at_depth_32(dropout):
    report = selu_fixed_point(depth=32, width=128, num_samples=512, dropout=dropout)
    assert len(report) == 32 and [r.layer for r in report] == list(range(32))
    for r in report:
        assert abs(r.mean) < 0.1, r
        assert abs(r.var - 1) < 0.15, r


def test_the_check_detects_a_drifting_network():
    # the same net with ReLU instead of SELU: with LeCun init the second moment halves every layer
    torch.manual_seed(0)
    m = self_normalizing_mlp(64, 64, 32, 64).double()
    for i, layer in enumerate(m):
        if isinstance(layer, torch.nn.SELU):
            m[i] = torch.nn.ReLU()
    report = activation_moments(m, torch.randn(512, 64, dtype=torch.float64), after=(torch.nn.ReLU,))
    assert report[-1].var < 1e-6


def test_activation_moments_restates_mean_and_variance():
    torch.manual_seed(0)
    m = self_normalizing_mlp(8, 2, 2, 16).double()
    x = torch.randn(50, 8, dtype=torch.float64)
    report = activation_moments(m, x)
    h1 = torch.nn.functional.selu(m[0](x))
    h2 = torch.nn.functional.selu(m[2](h1))
    for r, h in zip(report, (h1, h2), strict=True):
        assert r.mean == pytest.approx(h.mean().item())
        assert r.var == pytest.approx(((h - h.mean()) ** 2).mean().item())


def test_errors():
    with pytest.raises(ValueError, match="dropout must be in"):
        self_normalizing_mlp(3, 2, 2, 4, dropout=1.0)
    with pytest.raises(ValueError, match="width must be a positive int"):
        self_normalizing_mlp(3, 2, 2, 0)
    with pytest.raises(ValueError, match="depth must be a non-negative int"):
        self_normalizing_mlp(3, 2, -1, 4)
