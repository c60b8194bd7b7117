"""LayerNorm2d / RMSNorm2d output layout: timm's (channels-last strides), written by the C++ kernel.

timm's LayerNorm2d is ``permute(0, 2, 3, 1) → F.layer_norm → permute(0, 3, 1, 2)``: an ``(N, C, H, W)``
result in ``(N, H, W, C)`` memory. normkit's channels-first kernel writes that layout directly
(``cf_forward(..., y_nlc=True)``) and its backward reads a gradient in either layout in place. Checked
here against a plain formula (mean / biased variance over dim 1), not against normkit's code.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import normkit
import normkit.functional as F
from normkit.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the CPU kernels")

EPS = 1e-6


def formula(x, w, b, center):
    """(x − mean_C) / sqrt(var_C + eps) · w + b over dim 1 (RMS: mean 0, var = mean of squares)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(1, keepdim=True) if center else torch.zeros_like(x[:, :1])
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + EPS) * w.reshape(shape)
    return y + b.reshape(shape) if b is not None else y


def timm_layout(x):
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def assert_layout(y, like):
    """Same memory order as ``like`` (strides of size-1 dims do not matter)."""
    got = [s for s, n in zip(y.stride(), y.shape) if n > 1]
    want = [s for s, n in zip(like.stride(), like.shape) if n > 1]
    assert got == want, (y.shape, y.stride(), like.stride())


def norm2d(x, w, b, center, backend="kernels"):
    if center:
        return F.layer_norm2d(x, w, b, EPS, backend=backend)
    return F.rms_norm2d(x, w, EPS, bias=b, backend=backend)


def params(c, dtype, bias=True):
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_()
    b = (torch.randn(c, dtype=dtype) * 0.1).requires_grad_() if bias else None
    return w, b


SHAPES = [(2, 1, 5, 7), (2, 3, 5, 7), (2, 130, 9, 11), (3, 3, 70), (2, 130, 67), (1, 8, 1, 1)]


def grads(g_kind, shape, dtype):
    g = torch.randn(shape, dtype=dtype)
    if g_kind == "channels_last":
        return timm_layout(g)
    if g_kind == "slice":  # every other element of a wider tensor: neither layout, copied
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    if g_kind == "expanded":  # y.sum().backward()'s gradient: stride 0
        return torch.tensor(0.7, dtype=dtype).expand(shape)
    return g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("center", [True, False], ids=["ln2d", "rms2d"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_layout_and_gradients(shape, center, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w, b = params(shape[1], dtype)
    y = norm2d(x, w, b, center)
    ref = formula(x, w, b, center)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(y, ref, **tol)
    assert_layout(y, timm_layout(x.detach()))
    gtol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for kind in ("contiguous", "channels_last", "slice", "expanded"):
        g = grads(kind, shape, dtype)
        got = torch.autograd.grad(y, (x, w, b), g, retain_graph=True)
        want = torch.autograd.grad(ref, (x, w, b), g, retain_graph=True)
        assert got[0].is_contiguous()  # ∂x in x's layout
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **gtol)


@pytest.mark.parametrize("center", [True, False], ids=["ln2d", "rms2d"])
def test_modules_fast_path_and_auto_give_timm_layout(center):
    x = torch.randn(2, 64, 16, 16, requires_grad=True)  # 32K elements: "auto" and the modules' fast path take the kernels
    m = normkit.LayerNorm2d(64, eps=EPS) if center else normkit.RMSNorm2d(64, eps=EPS)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    y = m(x)
    assert_layout(y, timm_layout(x.detach()))
    torch.testing.assert_close(y, formula(x, m.weight, getattr(m, "bias", None), center))
    with normkit.backend.record() as calls:
        yf = norm2d(x, m.weight, getattr(m, "bias", None), center, backend="auto")
    assert ("layer_norm2d" if center else "rms_norm2d", "kernels") in calls, calls
    assert_layout(yf, y)
    (gx,) = torch.autograd.grad(y, x, timm_layout(torch.ones_like(x)))
    assert gx.is_contiguous()


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w, b = params(3, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: norm2d(*a, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: norm2d(*a, False), (x, w, b))


@pytest.mark.parametrize("y_nlc", [True, False])
def test_opcheck_operators(y_nlc):
    n, c, length = 2, 5, 7
    x = torch.randn(n, 1, c, length, dtype=torch.float64, requires_grad=True)
    w, b = params(c, torch.float64)
    opcheck(torch.ops.normkit.cf_norm.default, (x, w, b, n, c, length, True, EPS, y_nlc))
    y, mean, _, rstd = torch.ops.normkit.cf_norm(x.detach(), w.detach(), b.detach(), n, c, length, True, EPS, y_nlc)
    assert y.stride() == cpu.nlc_empty(x, n, c, length).stride() if y_nlc else y.is_contiguous()
    for g in (torch.randn(n, 1, c, length, dtype=torch.float64),
              torch.randn(n, length, c, dtype=torch.float64).transpose(1, 2).reshape(n, 1, c, length)):
        opcheck(torch.ops.normkit.cf_norm_backward.default,
                (g, x.detach(), w.detach(), mean, rstd, n, c, length, True, True, True))


def test_compiled_module_keeps_the_layout_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = normkit.LayerNorm2d(32, eps=EPS)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    cnt = CompileCounterWithBackend("inductor")
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    y, ye = cm(x), m(x)
    assert cnt.frame_count == 1
    assert any("normkit.cf_norm" in str(nd.target) for nd in cnt.graphs[0].graph.nodes)
    assert y.stride() == ye.stride()
    torch.testing.assert_close(y, ye)
    g = timm_layout(torch.randn_like(x))
    for a, e in zip(torch.autograd.grad(y, (x, m.weight, m.bias), g), torch.autograd.grad(ye, (x, m.weight, m.bias), g)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("center", [True, False], ids=["ln2d", "rms2d"])
def test_nan_propagates_to_its_position_only(center):
    x = torch.randn(2, 6, 5, 5)
    x[1, 2, 3, 4] = float("nan")
    w, b = params(6, torch.float32)
    y = norm2d(x, w, b, center).detach()
    assert torch.isnan(y[1, :, 3, 4]).all()
    y[1, :, 3, 4] = 0
    assert torch.isfinite(y).all()


def test_float32_overflow_range_stays_right():
    # |x| ~ 1e20: squares past FLT_MAX; the kernel's double fallback keeps the statistics
    x = torch.randn(2, 16, 9, 9) * 1e20
    w, b = params(16, torch.float32)
    y = norm2d(x, w, b, True)
    torch.testing.assert_close(y.double(), formula(x.double(), w.double(), b.double(), True), rtol=1e-4, atol=1e-4)


def test_thread_count_does_not_change_the_result():
    x = torch.randn(4, 40, 30, 30, requires_grad=True)  # past the one-thread grain
    w, b = params(40, torch.float32)
    g = timm_layout(torch.randn_like(x))
    prev = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y = norm2d(x, w, b, True)
            out.append((y, *torch.autograd.grad(y, (x, w, b), g)))
    finally:
        torch.set_num_threads(prev)
    for a, e in zip(out[0][:2], out[1][:2]):  # y and ∂x: per-position work, bit for bit
        assert torch.equal(a, e)
    for a, e in zip(out[0][2:], out[1][2:]):  # ∂w, ∂b: per-thread double sums, added in another order
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c,length", [(1, 9), (3, 1), (3, 65), (130, 300), (17, 64), (9, 63), (2050, 50)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_layouts_agree(c, length, dtype):
    # same arithmetic in both layouts: equal y, statistics and ∂x; ∂w/∂b to rounding (other chunking)
    n = 2
    x = torch.randn(n, 1, c, length, dtype=dtype)
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    y0, _, m0, v0, r0 = cpu.cf_forward(x, w, b, n, c, length, True, EPS)
    y1, _, m1, v1, r1 = cpu.cf_forward(x, w, b, n, c, length, True, EPS, y_nlc=True)
    assert torch.equal(y0, y1) and torch.equal(r0, r1) and torch.equal(v0, v1)
    assert_layout(y1, cpu.nlc_empty(x, n, c, length))
    g = torch.randn(n, length, c, dtype=dtype).transpose(1, 2).reshape(n, 1, c, length)
    d0 = cpu.cf_backward(g.contiguous(), x, w, m0, r0, n, c, length, True, True, True)
    d1 = cpu.cf_backward(g, x, w, m0, r0, n, c, length, True, True, True)
    assert torch.equal(d0[0], d1[0])
    torch.testing.assert_close(d0[1], d1[1])
    torch.testing.assert_close(d0[2], d1[2])


@pytest.mark.parametrize("center", [True, False], ids=["ln2d", "rms2d"])
@pytest.mark.parametrize("backend", ["auto", "kernels", "compiled"])
def test_channels_last_input_runs_as_rows_and_stays_channels_last(center, backend):
    x = timm_layout(torch.randn(2, 32, 16, 16)).requires_grad_()
    w, b = params(32, torch.float32, bias=center)
    with normkit.backend.record() as calls:
        y = norm2d(x, w, b, center, backend=backend)
    assert calls[0][0] == ("layer_norm" if center else "rms_norm"), calls  # the row norm: no copy of x
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, formula(x, w, b, center))
    m = normkit.LayerNorm2d(32) if center else normkit.RMSNorm2d(32)
    assert m(x).is_contiguous(memory_format=torch.channels_last)
