"""The fast default paths of the BatchNorm-family zoo layers (Batch Renorm, EstBN, BCN, IBN, AdaB2N):
equal to plain formulas written here (float64, 1e-12), saving at most ~1 input-sized tensor for
backward, and right at ×1e30 / ×1e-30 (float32 vs the float64 formula)."""

import pytest
import torch

from normkit.nn.batch_channel_norm import EstBN
from normkit.nn.batch_variants import BatchRenorm

D = torch.float64
DIMS = (0, 2, 3)


def _c(p):
    return p.reshape(1, -1, 1, 1)


def bn(x, mean, var, w, b, eps=1e-5):
    return (x - _c(mean)) / torch.sqrt(_c(var) + eps) * _c(w) + _c(b)


def batch_stats(x):
    m = x.mean(DIMS)
    return m, ((x - _c(m)) ** 2).mean(DIMS)


# --------------------------------------------------------------------------- plain formulas


def ref_renorm(x, rm, rv, w, b, r_max, d_max, eps=1e-5):
    """Ioffe 2017, Algorithm 1: r and d are constants for backprop."""
    m, v = batch_stats(x)
    s_b, s = torch.sqrt(v + eps), torch.sqrt(rv + eps)
    r = torch.clamp(s_b / s, 1 / r_max, r_max).detach()
    d = torch.clamp((m - rm) / s, -d_max, d_max).detach()
    return ((x - _c(m)) / _c(s_b) * _c(r) + _c(d)) * _c(w) + _c(b)


def ref_estbn(x, rm, rv, w, b, speed, eps=1e-5):
    """Official README EstBN: update the estimates (variance about the OLD mean), normalize with the new ones."""
    with torch.no_grad():
        m = x.mean(DIMS)
        v = ((x - _c(rm)) ** 2).mean(DIMS)
        nm, nv = (1 - speed) * rm + speed * m, (1 - speed) * rv + speed * v
    return bn(x, nm, nv, w, b, eps)


def _layer(name, c, dtype=D):
    torch.manual_seed(0)
    if name == "batchrenorm":
        m = BatchRenorm(c, schedule=False, r_max=1.5, d_max=0.5)
    elif name == "estbn":
        m = EstBN(c, moving_speed=0.3)
    else:
        raise AssertionError(name)
    with torch.no_grad():  # drawn in float32, then converted: the float32 and float64 layers are equal
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)
    return m.to(dtype)


def _ref(name, m, x):
    """The plain formula with the layer's parameters and its buffers *before* the call."""
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    if name == "batchrenorm":
        return ref_renorm(x, rm, rv, m.weight, m.bias, m.r_max, m.d_max)
    return ref_estbn(x, rm, rv, m.weight, m.bias, float(m.estbn_moving_speed))


NAMES = ["batchrenorm", "estbn"]


@pytest.mark.parametrize("name", NAMES)
def test_auto_equals_the_plain_formula_float64(name):
    m = _layer(name, 5)
    x = (torch.randn(6, 5, 4, 3, dtype=D) * 2 + 0.7).requires_grad_()
    g = torch.randn(6, 5, 4, 3, dtype=D)
    want = _ref(name, m, x)
    got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [x, m.weight, m.bias]
    gw = torch.autograd.grad(want, params, g)
    gg = torch.autograd.grad(got, params, g)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_saves_only_the_input(name):
    m = _layer(name, 8, torch.float32)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert sum(seen.values()) <= 2 * x.numel() * x.element_size() + 4096


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("name", NAMES)
def test_overflow_and_underflow_match_float64(name, scale):
    m = _layer(name, 4, torch.float32)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    md = _layer(name, 4, D)
    want = _ref(name, md, x.double() * scale)
    y = m(x * scale)
    assert torch.isfinite(y).all()
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", NAMES)
def test_nan_stays_nan(name):
    m = _layer(name, 4, torch.float32)
    x = torch.randn(3, 4, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    y = m(x)
    assert y[:, 2].isnan().all()  # the batch statistics of channel 2 are NaN (never masked)
    assert not y[:, :2].isnan().any()


def test_estbn_two_forwards_then_one_backward():
    # the estimates ATen's op receives are fresh tensors, not the buffers the next call overwrites
    m = _layer("estbn", 4, torch.float32)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    (m(x).sum() + m(x * 2).square().sum()).backward()
    assert torch.isfinite(x.grad).all()
