"""EvoNorm-B0 / EvoNorm-S0 against a plain statement of the official TF code."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.evonorm import evonorm_b0, evonorm_s0
from normkit.nn.evonorm import EvoNormB0, EvoNormS0

D = torch.float64


# --- the equations, written out (TF resnet_model.evonorm / _batch_std / _instance_std / _group_std) ---


def _c(p):
    return p.reshape(1, -1, 1, 1)


def var_over(x, dims):
    m = x.mean(dims, keepdim=True)
    return ((x - m) ** 2).mean(dims, keepdim=True)


def ref_b0(x, w, b, v, eps, var_b=None):
    """var_b None: training (batch variance); else the running variance (C,)."""
    vb = var_over(x, (0, 2, 3)) if var_b is None else _c(var_b)
    left = torch.sqrt(vb + eps)
    right = _c(v) * x + torch.sqrt(var_over(x, (2, 3)) + eps)
    return x / torch.maximum(left, right) * _c(w) + _c(b)


def ref_s0(x, groups, w, b, v, eps):
    n, c, h, wd = x.shape
    xg = x.reshape(n, groups, c // groups, h, wd)
    std = torch.sqrt(var_over(xg, (2, 3, 4)) + eps)
    den = std.expand_as(xg).reshape(x.shape)
    return x * torch.sigmoid(_c(v) * x) / den * _c(w) + _c(b)


def _rand_params(m):
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


# --- EvoNorm-B0 ---


def test_b0_train_eval_and_running_var_step_by_step():
    m = _rand_params(EvoNormB0(6, dtype=D))
    assert m.eps == 1e-5 and m.momentum == 0.1
    rv = torch.ones(6, dtype=D)
    for step in range(3):
        x = torch.randn(4, 6, 3, 5, dtype=D) * (step + 1) + step
        y = m(x)
        torch.testing.assert_close(y, ref_b0(x, m.weight, m.bias, m.v, 1e-5))
        # TF: mv <- mv - (mv - var_B) * (1 - 0.9), biased variance
        rv = rv - (rv - var_over(x, (0, 2, 3)).reshape(6)) * 0.1
        torch.testing.assert_close(m.running_var, rv)
    m.eval()
    x = torch.randn(2, 6, 4, 4, dtype=D)
    torch.testing.assert_close(m(x), ref_b0(x, m.weight, m.bias, m.v, 1e-5, var_b=rv))
    torch.testing.assert_close(m.running_var, rv)  # eval leaves it alone


def test_b0_unbiased_running_var_is_timms():
    m = EvoNormB0(4, unbiased_running_var=True, eps=1e-3, dtype=D)
    x = torch.randn(3, 4, 2, 2, dtype=D)
    m(x)
    n = 3 * 2 * 2
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var_over(x, (0, 2, 3)).reshape(4) * n / (n - 1))


def test_b0_apply_act_false_is_affine_only_as_official():
    m = _rand_params(EvoNormB0(4, apply_act=False, dtype=D))
    assert m.v is None and set(m.state_dict()) == {"weight", "bias", "running_var"}
    x = torch.randn(3, 4, 2, 2, dtype=D)
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), x * _c(m.weight) + _c(m.bias))
    assert torch.all(m.running_var == 1)


def test_b0_zero_init_and_keys():
    m = EvoNormB0(4, zero_init=True)
    assert torch.all(m.weight == 0) and torch.all(m.bias == 0) and torch.all(m.v == 1)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "weight": (4,),
        "bias": (4,),
        "v": (4,),
        "running_var": (4,),
    }


def test_b0_gradcheck_train_and_eval():
    x = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)
    w, b = torch.rand(4, dtype=D) + 0.5, torch.randn(4, dtype=D)
    v = torch.randn(4, dtype=D)
    w.requires_grad_(), b.requires_grad_(), v.requires_grad_()
    rv = torch.rand(4, dtype=D) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True), (x, w, b, v))
    assert torch.autograd.gradcheck(lambda x, w, b, v: evonorm_b0(x, rv, w, b, v, False), (x, w, b, v))
    # and the gradient is the reference's (gradients flow through the batch variance)
    y = evonorm_b0(x, None, w, b, v, True)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b, v), g)
    want = torch.autograd.grad(ref_b0(x, w, b, v, 1e-5), (x, w, b, v), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_b0_state_dict_round_trip_weights_only():
    m = _rand_params(EvoNormB0(4))
    for _ in range(2):
        m(torch.randn(3, 4, 2, 2))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = EvoNormB0(4)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(m2.running_var, m.running_var)
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(m2(x), m(x))
    m.eval(), m2.eval()
    torch.testing.assert_close(m2(x), m(x))


def test_b0_errors():
    with pytest.raises(ValueError, match="expects 4 channels.*got 3"):
        EvoNormB0(4)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, 4, \*spatial\)"):
        EvoNormB0(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="momentum"):
        EvoNormB0(4, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        EvoNormB0(4, eps=-1.0)
    with pytest.raises(ValueError, match="needs running_var"):
        evonorm_b0(torch.randn(2, 4, 2, 2), None, v=torch.ones(4), training=False)
    with pytest.raises(ValueError, match="needs the per-channel parameter v"):
        evonorm_b0(torch.randn(2, 4, 2, 2), None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        EvoNormB0(4)(torch.randn(1, 4, 1, 1))


# --- EvoNorm-S0 ---


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_s0_matches_equation_train_and_eval(groups):
    m = _rand_params(EvoNormS0(8, num_groups=groups, dtype=D))
    x = torch.randn(3, 8, 4, 5, dtype=D)
    want = ref_s0(x, groups, m.weight, m.bias, m.v, 1e-5)
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), want)


def test_s0_group_rules():
    assert EvoNormS0(64).num_groups == 32
    assert EvoNormS0(12).num_groups == 12  # TF lowers 32 to the largest divisor of C below it
    assert EvoNormS0(48).num_groups == 24
    assert EvoNormS0(12, num_groups=8).num_groups == 6
    assert EvoNormS0(12, group_size=4).num_groups == 3  # timm's group_size
    with pytest.raises(ValueError, match="num_groups=8 must divide num_channels=12"):
        EvoNormS0(12, num_groups=8, shrink_groups=False)
    with pytest.raises(ValueError, match="group_size=5"):
        EvoNormS0(12, group_size=5)
    with pytest.raises(ValueError, match="positive int"):
        EvoNormS0(12, num_groups=0)
    with pytest.raises(ValueError, match="num_groups=5 must be a positive divisor of the 12 channels"):
        evonorm_s0(torch.randn(2, 12, 2, 2), 5, v=torch.ones(12))
    with pytest.raises(ValueError, match="expects 8 channels.*got 6"):
        EvoNormS0(8, num_groups=4)(torch.randn(2, 6, 2, 2))


def test_s0_apply_act_false_and_gradcheck():
    m = _rand_params(EvoNormS0(4, num_groups=2, apply_act=False, dtype=D))
    assert m.v is None
    x = torch.randn(2, 4, 3, 3, dtype=D)
    torch.testing.assert_close(m(x), x * _c(m.weight) + _c(m.bias))
    x.requires_grad_()
    w, b, v = (torch.randn(4, dtype=D, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda x, w, b, v: evonorm_s0(x, 2, w, b, v), (x, w, b, v))


@pytest.mark.slow
def test_compiled_backend_agrees():
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    v = torch.randn(8, requires_grad=True)
    outs = []
    for be in ("eager", "compiled"):
        y = evonorm_b0(x, None, None, None, v, True, backend=be) + evonorm_s0(x, 4, v=v, backend=be)
        outs.append((y, *torch.autograd.grad(y.sin().sum(), (x, v))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.05, 20.0))
def test_b0_train_and_s0_with_v0_are_positive_scale_invariant(seed, a):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 3, 3, generator=g, dtype=D)
    v = torch.randn(4, generator=g, dtype=D)
    b0 = evonorm_b0(x, None, v=v, training=True, eps=0.0)
    torch.testing.assert_close(evonorm_b0(a * x, None, v=v, training=True, eps=0.0), b0)
    z = torch.zeros(4, dtype=D)
    torch.testing.assert_close(evonorm_s0(a * x, 2, v=z, eps=0.0), evonorm_s0(x, 2, v=z, eps=0.0))
