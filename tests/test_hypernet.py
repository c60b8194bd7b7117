"""MIP hypernetworks (Ortiz et al. 2024, arXiv:2304.07645): encoding, additive output and the official init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normkit.models.hypernet import HyperNet, encode_input


def test_cos_sin_encoding_and_its_constant_norm() -> None:
    z = torch.tensor([[0.0, 0.25, 1.0], [0.5, 0.9, 0.1]])
    e = encode_input(z)
    expected = torch.tensor(
        [[math.cos(math.pi * v / 2) for v in row] + [math.sin(math.pi * v / 2) for v in row] for row in z.tolist()]
    )
    torch.testing.assert_close(e, expected)
    torch.testing.assert_close(e.norm(dim=-1), torch.full((2,), math.sqrt(3)))
    torch.testing.assert_close(encode_input(z, "z|1-z"), torch.cat([z, 1 - z], -1))
    assert encode_input(z, None) is z
    with pytest.warns(UserWarning, match=r"outside \[0, 1\]"):
        encode_input(torch.tensor([1.5]))


def test_official_initialisation_statistics() -> None:
    torch.manual_seed(0)
    shapes = {"0.weight": (100, 60), "0.bias": (100,), "1.weight": (20, 10)}
    h = HyperNet(2, shapes, hidden_sizes=(128, 256))
    lin0, lin1 = h.backbone[0], h.backbone[2]
    # kaiming normal, fan_out, leaky_relu with a=0 → std √2/√fan_out; zero biases
    assert lin0.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert lin1.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert isinstance(h.backbone[1], nn.LeakyReLU) and h.backbone[1].negative_slope == 0.01
    assert float(lin0.bias.detach().abs().max()) == 0.0
    w = h.output.weight.detach()
    # per predicted tensor: fan_out = numel of that tensor
    assert w[:6000].std().item() == pytest.approx(math.sqrt(2 / 6000), rel=0.05)
    assert w[6100:].std().item() == pytest.approx(math.sqrt(2 / 200), rel=0.05)
    theta0 = {k: v.detach() for k, v in h.independent_weights().items()}
    assert theta0["0.weight"].std().item() == pytest.approx(math.sqrt(2 / 60), rel=0.06)  # fan-in, gain √2
    assert theta0["1.weight"].std().item() == pytest.approx(math.sqrt(2 / 10), rel=0.2)
    assert float(theta0["0.bias"].abs().max()) == 0.0


def test_output_is_theta0_plus_delta() -> None:
    torch.manual_seed(0)
    primary = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.LayerNorm(5), nn.Linear(5, 2))
    h = HyperNet.for_module(primary, num_inputs=1, hidden_sizes=(8,))
    assert list(h.output_shapes) == [n for n, _ in primary.named_parameters()]
    theta0 = {k: v.detach().clone() for k, v in h.independent_weights().items()}
    assert float(theta0["2.weight"].min()) == 1.0  # the named divergence: a norm gain starts at 1
    z = torch.tensor([0.7])
    out = h(z)
    with torch.no_grad():
        enc = encode_input(z)
        hidden = torch.nn.functional.leaky_relu(h.backbone[0](enc), 0.01)
        delta = hidden @ h.output.weight.T
    for name, (start, size) in h.offsets.items():
        torch.testing.assert_close(out[name], theta0[name] + delta[start : start + size].view(theta0[name].shape))
    y = torch.func.functional_call(primary, out, (torch.randn(4, 3),))
    assert y.shape == (4, 2)
    batch = h(torch.tensor([[0.1], [0.9]]))
    assert batch["0.weight"].shape == (2, 5, 3)
    plain = HyperNet(1, {"w": (2, 2)}, (4,), encoding=None, residual=False)
    assert float(plain.output.bias.detach().abs().max()) == 0.0 and plain.backbone[0].in_features == 1


def test_set_independent_weights_and_bad_input() -> None:
    h = HyperNet(2, {"a.weight": (2, 3), "a.bias": (2,)}, (4,))
    h.set_independent_weights({"a.weight": torch.ones(2, 3), "a.bias": torch.full((2,), 2.0)})
    torch.testing.assert_close(h.output.bias, torch.tensor([1.0] * 6 + [2.0, 2.0]))
    with pytest.raises(ValueError, match="missing"):
        h.set_independent_weights({"a.weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="expected shape"):
        h.set_independent_weights({"a.weight": torch.ones(3, 2), "a.bias": torch.ones(2)})
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(B, 2\)"):
        h(torch.zeros(3))
    with pytest.raises(TypeError, match="tensor"):
        h([0.1, 0.2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="encoding"):
        HyperNet(1, {"w": (1,)}, (2,), encoding="fourier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_sizes"):
        HyperNet(1, {"w": (1,)}, ())
    with pytest.raises(ValueError, match="num_inputs"):
        HyperNet(0, {"w": (1,)}, (2,))
    with pytest.raises(ValueError, match="output_shapes"):
        HyperNet(1, {}, (2,))
