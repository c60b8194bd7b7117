"""Normalizer-free tools: Scaled WS conv, gamma-scaled activations, SkipInit, NF-ResNet block."""

import math

import pytest
import torch
import torch.nn.functional as TF

from normkit.models.nf_resnet import NFBlock, NFResNet, StochasticDepth, nf_expected_stds, nf_output_std, nf_stages
from normkit.nn.normalizer_free import (
    ACTIVATIONS,
    GAMMA,
    GammaAct,
    ScaledStdConv2d,
    SkipInit,
    compute_gamma,
    gamma_act,
    scaled_standardize_weight,
)

D = torch.float64


def ref_scaled_ws(w, gain, eps=1e-4):
    # official WSConv2D.standardize_weight, in OIHW: biased variance over the fan-in, eps clamps N·var
    n = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return (w - mean) * gain.reshape(-1, 1, 1, 1) / torch.sqrt(torch.maximum(var * n, torch.full_like(var, eps)))


# --------------------------------------------------------------------------- Scaled WS


def test_scaled_std_conv_matches_official_formula():
    conv = ScaledStdConv2d(3, 5, 3, padding=1).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2)
        conv.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    torch.testing.assert_close(conv(x), TF.conv2d(x, ref_scaled_ws(conv.weight, conv.gain), conv.bias, padding=1))
    assert conv.gain.shape == (5, 1, 1, 1) and set(conv.state_dict()) == {"weight", "bias", "gain"}
    # each standardized filter has unit norm times its gain: sum of squares = gain²
    w = conv.standardized_weight()
    torch.testing.assert_close(w.pow(2).sum((1, 2, 3)), conv.gain.detach().reshape(-1) ** 2)


def test_eps_is_a_floor_in_max_not_added():
    w = torch.randn(4, 2, 3, 3, dtype=D) * 1e-4  # N·var ≈ 18e-8 < 1e-4: the floor is active
    g = torch.ones(4, dtype=D)
    got = scaled_standardize_weight(w, g, 1e-4)
    torch.testing.assert_close(got, ref_scaled_ws(w, g))
    torch.testing.assert_close(got, (w - w.mean((1, 2, 3), keepdim=True)) / math.sqrt(1e-4))
    big = torch.randn(4, 2, 3, 3, dtype=D)  # far above the floor: no eps at all
    mean = big.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(
        scaled_standardize_weight(big, g), (big - mean) / torch.sqrt(18 * ((big - mean) ** 2).mean((1, 2, 3), keepdim=True))
    )


def test_scaled_std_conv_init_and_options():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(16, 64, 3, gain_init=0.5)
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(16 * 9), rel=0.05)  # LeCun normal
    assert torch.all(conv.bias == 0) and torch.all(conv.gain == 0.5)
    assert ScaledStdConv2d(3, 4, 1, bias=False).bias is None
    assert "eps=0.0001" in repr(conv)


def test_gradcheck_float64():
    w = torch.randn(2, 2, 3, 3, dtype=D, requires_grad=True)
    g = (torch.rand(2, 1, 1, 1, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=D, requires_grad=True)
    x = torch.randn(1, 2, 3, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, g, b: TF.conv2d(x, scaled_standardize_weight(w, g), b, padding=1), (x, w, g, b))
    conv = ScaledStdConv2d(2, 2, 3, padding=1).double()
    assert torch.autograd.gradcheck(conv, (x,))


# --------------------------------------------------------------------------- gamma activations


def test_gamma_act_is_gamma_times_activation():
    x = torch.randn(100, dtype=D)
    torch.testing.assert_close(GammaAct("relu")(x), 1.7139588594436646 * torch.relu(x))
    torch.testing.assert_close(gamma_act("gelu")(x), 1.7015043497085571 * TF.gelu(x, approximate="tanh"))
    torch.testing.assert_close(gamma_act("swish")(x), 1.7881293296813965 * TF.silu(x))
    assert gamma_act("relu", gamma=2.0).gamma == 2.0 and "gamma=1.71" in repr(GammaAct())
    assert set(ACTIVATIONS) == set(GAMMA)
    with pytest.raises(ValueError, match="unknown gamma-scaled activation 'glu'; valid names: .*relu"):
        gamma_act("glu")


@pytest.mark.parametrize("name", sorted(GAMMA))
def test_gamma_constants_recomputed(name):
    # γ = 1 / sqrt(Var[g(z)]), z ~ N(0, 1): (1) the exact Gaussian integral on a fine grid ...
    z = torch.linspace(-12, 12, 200_001, dtype=D)
    p = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    y = ACTIVATIONS[name](z)
    mean = (y * p).sum()
    exact = 1 / torch.sqrt(((y - mean) ** 2 * p).sum()).item()
    assert GAMMA[name] == pytest.approx(exact, rel=1.5e-3)
    # (2) ... and a Monte-Carlo estimate, as the official constants were obtained
    assert GAMMA[name] == pytest.approx(compute_gamma(name, 1 << 20), rel=4e-3)


def test_relu_gamma_closed_form():
    assert GAMMA["relu"] == pytest.approx(1 / math.sqrt(0.5 - 1 / (2 * math.pi)), rel=1e-3)


# --------------------------------------------------------------------------- SkipInit


def test_skipinit():
    s = SkipInit()
    x = torch.randn(3, 4, requires_grad=True)
    y = s(x)
    assert torch.all(y == 0) and s.gain.shape == () and float(s.gain.detach()) == 0.0
    (g,) = torch.autograd.grad(y.sum(), s.gain)
    torch.testing.assert_close(g, x.sum().detach())
    torch.testing.assert_close(SkipInit(0.5)(x), 0.5 * x)


# --------------------------------------------------------------------------- NF block


def test_expected_std_recurrence_by_hand():
    a2 = 0.2**2
    stds = nf_expected_stds((2, 3), 0.2)
    # stage 1: 1, sqrt(1+α²); stage 2 starts at the stage-1 output sqrt(1+2α²), resets: sqrt(1+α²), sqrt(1+2α²)
    want = [1.0, math.sqrt(1 + a2), math.sqrt(1 + 2 * a2), math.sqrt(1 + a2), math.sqrt(1 + 2 * a2)]
    assert stds == pytest.approx(want)
    assert nf_output_std((2, 3), 0.2) == pytest.approx(math.sqrt(1 + 3 * a2))
    body = nf_stages(8, (8, 16), (2, 3), (1, 2), alpha=0.2)
    assert [blk.beta for blk in body] == pytest.approx(want)
    assert [blk.conv_shortcut is not None for blk in body] == [False, False, True, False, False]


def test_block_forward_restated():
    torch.manual_seed(0)
    blk = NFBlock(8, 16, stride=2, beta=1.3, alpha=0.3, skip_gain_init=0.7).double()
    x = torch.randn(2, 8, 6, 6, dtype=D)
    g = GAMMA["relu"]

    def conv(m, h, stride=1, pad=0):
        return TF.conv2d(h, ref_scaled_ws(m.weight, m.gain), m.bias, stride=stride, padding=pad)

    out = g * torch.relu(x) / 1.3
    shortcut = conv(blk.conv_shortcut, out, stride=2)
    h = conv(blk.conv0, out)
    h = conv(blk.conv1, g * torch.relu(h), stride=2, pad=1)
    h = conv(blk.conv2, g * torch.relu(h))
    torch.testing.assert_close(blk(x), 0.7 * h * 0.3 + shortcut)
    assert blk.width == 4


def test_skipinit_block_is_identity_at_init():
    blk = NFBlock(8, 8, beta=1.1)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(blk(x), x)


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_variance_follows_the_recurrence_at_init(alpha):
    # with the skip gain at 1 (SkipInit off) each block adds α² of unit-variance signal;
    # transition blocks restart at 1 + α²; "variance" = the average channel variance (official signal_metrics)
    torch.manual_seed(0)
    depths = (3, 3)
    body = nf_stages(32, (32, 64), depths, (1, 2), alpha=alpha, skip_gain_init=1.0)
    expected = nf_expected_stds([*depths, 1], alpha)[1:]
    h = torch.randn(8, 32, 12, 12)
    with torch.no_grad():
        for i, blk in enumerate(body):
            h = blk(h)
            var = h.var(dim=(0, 2, 3)).mean().item()
            assert var == pytest.approx(expected[i] ** 2, rel=0.1), (i, var, expected[i] ** 2)


def test_stochastic_depth_and_network():
    sd = StochasticDepth(0.5)
    x = torch.ones(64, 3, 2, 2)
    y = sd(x)
    kept = y.flatten(1).all(1)
    assert torch.all(y.flatten(1)[~kept] == 0) and 0 < kept.sum() < 64  # per-sample, no rescaling
    sd.eval()
    assert sd(x) is x
    net = NFResNet(5, depths=(1, 2), widths=(8, 16), stem_width=8, stochdepth_rate=0.2, use_se=True, small_input=True)
    assert net.blocks[2].stoch_depth.rate == pytest.approx(0.2 * 2 / 3)
    assert net.expected_stds == pytest.approx(nf_expected_stds((1, 2)))
    xin = torch.randn(2, 3, 8, 8)
    for mode in (True, False):
        net.train(mode)
        assert net(xin).shape == (2, 5)
    assert net.fc.weight.std().item() == pytest.approx(0.01, rel=0.5)


def test_errors():
    with pytest.raises(ValueError, match="beta .* must be positive"):
        NFBlock(4, 4, beta=0.0)
    with pytest.raises(ValueError, match="one entry per stage"):
        nf_stages(4, (4, 8), (1,), (1, 2))
    with pytest.raises(ValueError, match="gain must have one value per output unit"):
        scaled_standardize_weight(torch.randn(3, 2, 1, 1), torch.ones(2))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        ScaledStdConv2d(2, 3, 1, eps=-1.0)
