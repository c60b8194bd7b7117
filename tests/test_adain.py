"""AdaIN against plain statements of the official Torch7 code, the PyTorch port, and its defining property."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.adain import adain
from normkit.nn.adain import AdaIN

D = torch.float64


def lua_adain(content, style, eps=1e-5):
    """AdaptiveInstanceNormalization.lua: training-mode BN on an (1, N·C, H, W) view, weight = std(3, true), bias = mean."""
    n, c = content.shape[:2]
    sv = style.reshape(n, c, -1)
    target_std = torch.sqrt(((sv - sv.mean(2, keepdim=True)) ** 2).mean(2))  # Torch7 std(dim, true): divide by n
    target_mean = sv.mean(2)
    view = content.reshape(1, n * c, -1)
    mean = view.mean(2, keepdim=True)
    var = ((view - mean) ** 2).mean(2, keepdim=True)  # BN training: biased variance, eps inside
    normed = (view - mean) / torch.sqrt(var + eps)
    return (normed * target_std.reshape(1, -1, 1) + target_mean.reshape(1, -1, 1)).reshape(content.shape)


def pytorch_port_adain(content, style, eps=1e-5):
    """naoto0804/pytorch-AdaIN function.py: calc_mean_std uses var() (unbiased) + eps for both inputs."""

    def calc_mean_std(feat):
        n, c = feat.shape[:2]
        std = (feat.reshape(n, c, -1).var(dim=2) + eps).sqrt().reshape(n, c, 1, 1)
        return feat.reshape(n, c, -1).mean(dim=2).reshape(n, c, 1, 1), std

    s_mean, s_std = calc_mean_std(style)
    c_mean, c_std = calc_mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


def test_matches_official_lua_and_the_pytorch_port():
    content = torch.randn(2, 3, 5, 4, dtype=D) * 2 + 1
    style = torch.randn(2, 3, 7, 6, dtype=D) * 0.5 - 2  # another spatial size
    torch.testing.assert_close(adain(content, style), lua_adain(content, style))
    torch.testing.assert_close(AdaIN(3)(content, style), lua_adain(content, style))
    torch.testing.assert_close(adain(content, style, unbiased=True, style_eps=True), pytorch_port_adain(content, style))
    # the two conventions really differ
    assert (adain(content, style) - pytorch_port_adain(content, style)).abs().max() > 1e-3


def test_alpha_interpolates_content_and_stylized():
    content = torch.randn(2, 3, 4, 4, dtype=D)
    style = torch.randn(2, 3, 4, 4, dtype=D) * 3
    m = AdaIN(3)
    t = lua_adain(content, style)
    torch.testing.assert_close(m(content, style, alpha=0.3), 0.3 * t + 0.7 * content)
    torch.testing.assert_close(m(content, style, alpha=0.0), content)
    torch.testing.assert_close(m(content, style, alpha=1), t)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    hw=st.integers(2, 6),
    hw_s=st.integers(1, 6),
    scale=st.floats(0.1, 10.0),
    shift=st.floats(-5.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_output_has_the_styles_mean_and_std(n, c, hw, hw_s, scale, shift, seed):
    torch.manual_seed(seed)
    content = torch.randn(n, c, hw, 3, dtype=D) * 4 + 2
    style = torch.randn(n, c, hw_s, 3, dtype=D) * scale + shift
    y = adain(content, style, eps=0.0)
    dims = (2, 3)
    torch.testing.assert_close(y.mean(dims), style.mean(dims))
    torch.testing.assert_close(y.std(dims, correction=0), style.std(dims, correction=0))
    # with the unbiased convention, the unbiased std is transferred
    y_u = adain(content, style if hw_s > 1 else style.repeat(1, 1, 2, 1), eps=0.0, unbiased=True)
    s2 = style if hw_s > 1 else style.repeat(1, 1, 2, 1)
    torch.testing.assert_close(y_u.std(dims), s2.std(dims))


def test_gradcheck_content_and_style():
    content = torch.randn(2, 3, 3, 4, dtype=D, requires_grad=True)
    style = torch.randn(2, 3, 2, 5, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, s: adain(c, s), (content, style))
    assert torch.autograd.gradcheck(lambda c, s: adain(c, s, unbiased=True, style_eps=True), (content, style))
    assert torch.autograd.gradcheck(lambda c, s: AdaIN(3)(c, s, alpha=0.4), (content, style))


def test_constant_style_channel_has_finite_gradient():
    content = torch.randn(2, 3, 4, 4, requires_grad=True)
    style = torch.randn(2, 3, 4, 4)
    style[:, 1] = 0.0  # a dead ReLU channel
    style.requires_grad_()
    y = adain(content, style)
    torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]), atol=1e-12, rtol=0)
    y.square().sum().backward()
    assert torch.isfinite(content.grad).all() and torch.isfinite(style.grad).all()


def test_half_precision_and_other_ranks():
    content = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    style = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    y = adain(content, style)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), adain(content.float(), style.float()), atol=5e-2, rtol=5e-2)


def test_errors():
    m = AdaIN(4)
    c = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="needs the style"):
        m(c)
    with pytest.raises(ValueError, match=r"style of shape \(N, 4, \*spatial\)"):
        m(c, torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"content of shape \(N, 4, \*spatial\)"):
        m(torch.randn(2, 5, 3, 3), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="same N, C"):
        m(c, torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match="same N, C"):
        m(c, torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="alpha must be a number in"):
        m(c, torch.randn(2, 4, 3, 3), alpha=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        adain(c, torch.ones(2, 4, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 spatial"):
        adain(c, torch.randn(2, 4, 1, 1), unbiased=True)
    with pytest.raises(ValueError, match="eps"):
        AdaIN(4, eps=float("nan"))
    assert "unbiased=True" in repr(AdaIN(4, unbiased=True))
