"""FRN(+TLU) and GRN against plain statements of their equations."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.response_norm import filter_response_norm, global_response_norm
from normkit.nn.response_norm import FilterResponseNorm, GlobalResponseNorm

D = torch.float64


def _c(p, x):
    return p.reshape((1, -1) + (1,) * (x.dim() - 2))


def ref_frn(x, gamma, beta, tau, eps):
    """Paper's FRNLayer, NCHW: nu2 = mean(x², HW); x·rsqrt(nu2 + |eps|); max(γx + β, τ)."""
    dims = tuple(range(2, x.dim()))
    nu2 = (x * x).mean(dims, keepdim=True) if dims else x * x
    y = _c(gamma, x) * (x / torch.sqrt(nu2 + abs(eps))) + _c(beta, x)
    return y if tau is None else torch.maximum(y, _c(tau, x))


def ref_grn_nhwc(x, gamma, beta, eps=1e-6):
    """The official ConvNeXt-V2 GRN, channels-last (N, H, W, C)."""
    gx = torch.sqrt((x * x).sum((1, 2), keepdim=True))
    nx = gx / (gx.mean(-1, keepdim=True) + eps)
    return gamma * (x * nx) + beta + x


def _rand(m):
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1.0, 1.0)
    return m


# --- FRN ---


def test_frn_matches_equation_train_and_eval():
    m = _rand(FilterResponseNorm(6, dtype=D))
    assert m.eps == 1e-6
    x = torch.randn(3, 6, 4, 5, dtype=D)
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), ref_frn(x, m.weight, m.bias, m.tau, 1e-6))
    m2 = _rand(FilterResponseNorm(6, apply_act=False, dtype=D))
    assert m2.tau is None
    torch.testing.assert_close(m2(x), ref_frn(x, m2.weight, m2.bias, None, 1e-6))


def test_frn_defaults_and_tlu_is_relu_shift():
    m = FilterResponseNorm(4)
    assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and torch.all(m.tau == 0)
    x = torch.randn(2, 4, 3, 3)
    # with γ=1, β=0, τ=0 the TLU is a ReLU of the normalized input
    torch.testing.assert_close(m(x), torch.relu(ref_frn(x, m.weight, m.bias, None, 1e-6)))


def test_frn_learned_eps_and_1x1_maps():
    m = _rand(FilterResponseNorm(5, learnable_eps=True, dtype=D))
    assert m.learned_eps.shape == (1,)
    with torch.no_grad():
        m.learned_eps.fill_(-0.3)  # |ε_l| is used
    x = torch.randn(4, 5, dtype=D)  # (N, C): 1x1 maps, ν² = x²
    torch.testing.assert_close(m(x), ref_frn(x, m.weight, m.bias, m.tau, 1e-6 + 0.3))
    assert FilterResponseNorm(5, learnable_eps=True).learned_eps.item() == pytest.approx(1e-4)
    # the learned ε gets a gradient
    m(x).sum().backward()
    assert m.learned_eps.grad is not None and m.learned_eps.grad.abs().item() > 0


def test_frn_gradcheck():
    x = torch.randn(2, 3, 3, 3, dtype=D, requires_grad=True)
    g, b, t = (torch.randn(3, dtype=D, requires_grad=True) for _ in range(3))
    e = torch.tensor([0.05], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, b, t, e: filter_response_norm(x, g, b, t, 1e-6, learned_eps=e), (x, g, b, t, e))


def test_frn_errors():
    with pytest.raises(ValueError, match="expects 4 channels.*got 3"):
        FilterResponseNorm(4)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        FilterResponseNorm(4)(torch.randn(4))
    with pytest.raises(ValueError, match="eps"):
        FilterResponseNorm(4, eps=-1e-6)
    with pytest.raises(ValueError, match="tau must have 4 elements"):
        filter_response_norm(torch.randn(2, 4, 2, 2), tau=torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        FilterResponseNorm(4)(torch.ones(2, 4, 2, 2, dtype=torch.long))


# --- GRN ---


def test_grn_matches_official_channels_first_and_last():
    m = _rand(GlobalResponseNorm(6, dtype=D))
    x = torch.randn(3, 6, 4, 5, dtype=D)
    nhwc = x.permute(0, 2, 3, 1)
    want = ref_grn_nhwc(nhwc, m.weight.reshape(1, 1, 1, 6), m.bias.reshape(1, 1, 1, 6))
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), want.permute(0, 3, 1, 2))
    ml = GlobalResponseNorm(6, channels_last=True, dtype=D)
    ml.load_state_dict(m.state_dict())
    torch.testing.assert_close(ml(nhwc), want)


def test_grn_zero_init_is_identity_and_loads_official_keys():
    m = GlobalResponseNorm(4)
    assert torch.all(m.weight == 0) and torch.all(m.bias == 0)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x), x)
    gamma, beta = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    m.load_state_dict({"gamma": gamma, "beta": beta})  # official ConvNeXt-V2 GRN keys
    torch.testing.assert_close(m.weight, gamma.reshape(4))
    torch.testing.assert_close(m(x), ref_grn_nhwc(x.permute(0, 2, 3, 1), gamma, beta).permute(0, 3, 1, 2))
    m.load_state_dict({"weight": gamma.reshape(1, 4, 1, 1), "bias": beta.reshape(1, 4, 1, 1)})  # timm NCHW shapes
    torch.testing.assert_close(m.bias, beta.reshape(4))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = GlobalResponseNorm(4)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(m2(x), m(x))


def test_grn_gradcheck_both_layouts():
    x = torch.randn(2, 3, 2, 3, dtype=D, requires_grad=True)
    g, b = (torch.randn(3, dtype=D, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, g, b: global_response_norm(x, g, b), (x, g, b))
    xl = torch.randn(2, 2, 3, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, b: global_response_norm(x, g, b, channels_last=True), (xl, g, b))


def test_grn_errors():
    with pytest.raises(ValueError, match=r"\(N, 4, \*spatial\).*\(2, 3, 2, 2\)"):
        GlobalResponseNorm(4)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, \*spatial, 4\)"):
        GlobalResponseNorm(4, channels_last=True)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="at least one spatial dim"):
        GlobalResponseNorm(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive int"):
        GlobalResponseNorm(0)


@pytest.mark.slow
def test_compiled_backend_agrees():
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    outs = []
    for be in ("eager", "compiled"):
        y = filter_response_norm(x, w, None, w, backend=be) + global_response_norm(x, w, w, backend=be)
        outs.append((y, *torch.autograd.grad(y.sin().sum(), (x, w))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.05, 20.0))
def test_frn_scale_invariant_and_grn_homogeneous(seed, a):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=D)
    w, b = torch.randn(4, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)
    torch.testing.assert_close(filter_response_norm(a * x, w, b, b, eps=0.0), filter_response_norm(x, w, b, b, eps=0.0))
    torch.testing.assert_close(global_response_norm(a * x, w, eps=0.0), a * global_response_norm(x, w, eps=0.0))
