"""PowerNorm on csrc/power_norm.cpp (backend "auto"/"kernels", plain configuration) against the ATen path
and a plain statement of the official training step (sIncerass/powernorm MaskPowerNorm + GroupScaling1D)."""

import pytest
import torch

from normkit import backend
from normkit.kernels import ops
from normkit.nn.power_norm import PowerNorm

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="normkit CPU kernels not built")

C = 16


def _module(dtype, **kw):
    torch.manual_seed(1)
    m = PowerNorm(C, dtype=dtype, **kw)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return m


def _step(m, x, gy, **fw):
    x = x.detach().requires_grad_()
    y = m(x, **fw)
    params = [p for p in (m.weight, m.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], gy)
    return (y, *grads)


def _runs(be, m, xs, gys):
    """Outputs, gradients and buffers of consecutive training steps under backend ``be``."""
    out = []
    with backend.set_backend(be), backend.record() as calls:
        for x, gy in zip(xs, gys):
            out.append((*_step(m, x, gy), m.running_phi.clone(), m.ema_gz.clone(), m.iters.clone()))
    return out, calls


CONFIGS = [
    {"warmup_iters": 2},
    {"warmup_iters": 1, "num_groups": 4, "paper_exact": True, "alpha_fwd": 0.8, "alpha_bkw": 0.7},
    {"warmup_iters": 2, "num_groups": None},
    {"warmup_iters": 0, "num_groups": 2, "affine": False},
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_steps_equal_the_aten_path(kw, dtype):
    """Four steps across warmup (batch, then running statistics): y, ∂x, ∂w, ∂b and every buffer."""
    torch.manual_seed(0)
    xs = [torch.randn(3, 40, C, dtype=dtype) * (1 + s) + 0.3 for s in range(4)]
    gys = [torch.randn(3, 40, C, dtype=dtype) for _ in range(4)]
    fast, calls = _runs("auto", _module(dtype, **kw), xs, gys)
    assert ("power_norm", "kernels") in calls
    plain, calls = _runs("eager", _module(dtype, **kw), xs, gys)
    assert ("power_norm", "kernels") not in calls
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for a, b in zip(fast, plain):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, **tol)


def test_kernel_step_equals_the_official_formula_written_out():
    """One warmup step (float64): GroupScaling1D, ψ² = mean(x²), z, y, the approximate backward."""
    torch.manual_seed(2)
    groups, eps, a_bkw = 2, 1e-5, 0.9
    m = _module(torch.float64, warmup_iters=5, num_groups=groups)
    ema = torch.randn(C, dtype=torch.float64)
    m.ema_gz.copy_(ema)
    x = torch.randn(50, C, dtype=torch.float64) * 3 + 1
    gy = torch.randn(50, C, dtype=torch.float64)
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    y, dx, dw, db = _step(m, x, gy)
    xr = x.clone().requires_grad_()
    xg = xr.reshape(50, groups, C // groups)
    xs = (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + 1e-5)).reshape(50, C)
    var = (xs.detach() ** 2).mean(0)
    z = xs.detach() / torch.sqrt(var + eps)
    g = gy * w
    approx = g - (1 - a_bkw) * ema * z
    (want_dx,) = torch.autograd.grad(xs, xr, approx / torch.sqrt(var + eps))
    for got, want in ((y, w * z + b), (dx, want_dx), (dw, (gy * z).sum(0)), (db, gy.sum(0)),
                      (m.ema_gz, ema + (approx * z).mean(0)), (m.running_phi, 0.9 * var + 0.1 * var)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fallbacks_keep_the_aten_path(monkeypatch):
    """pad_mask, stats_dtype and unavailable kernels (NORMKIT_CPU_KERNELS=0) take the ATen path, same result."""
    torch.manual_seed(3)
    x, gy = torch.randn(2, 30, C, dtype=torch.float64), torch.randn(2, 30, C, dtype=torch.float64)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    for m, kw in ((_module(torch.float64), {"pad_mask": pad}), (_module(torch.float32, stats_dtype=torch.float64), {})):
        with backend.record() as calls:
            _step(m, x.to(m.weight.dtype), gy.to(m.weight.dtype), **kw)
        assert ("power_norm", "kernels") not in calls
    ref = _step(_module(torch.float64), x, gy)
    monkeypatch.setattr(backend, "_cpu_kernels_available", lambda: False)
    with backend.record() as calls:
        got = _step(_module(torch.float64), x, gy)
    assert ("power_norm", "kernels") not in calls
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_saves_only_the_input_and_statistics():
    m = _module(torch.float32, num_groups=4)
    x = torch.randn(64, 32, C, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert sum(packed) <= x.numel() * x.element_size() + 64 * 32 * 4 * 4 + 16 * C * 4


def test_column_sums_do_not_depend_on_the_thread_count():
    torch.manual_seed(4)
    x, gy = torch.randn(4096, C * 2), torch.randn(4096, C * 2)  # above the one-thread size
    outs = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            m = PowerNorm(C * 2, num_groups=2)
            outs.append((*_step(m, x, gy), m.running_phi.clone(), m.ema_gz.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for u, v in zip(outs[0], other):
            assert torch.equal(u, v)


def test_double_backward_equals_the_aten_path():
    torch.manual_seed(5)
    x, gy = torch.randn(20, C, dtype=torch.float64), torch.randn(20, C, dtype=torch.float64)
    res = []
    for be in ("auto", "eager"):
        m = _module(torch.float64, num_groups=2)
        m.ema_gz.fill_(0.3)
        xr = x.clone().requires_grad_()
        with backend.set_backend(be):
            (dx,) = torch.autograd.grad(m(xr), xr, gy, create_graph=True)
            (ddx,) = torch.autograd.grad(dx.square().sum(), xr)
        res.append((dx, ddx, m.ema_gz))
    for u, v in zip(*res):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("be", ["auto", "eager"])
def test_float32_past_the_square_range_keeps_ema_gz_finite(be):
    """|x| ~ 1e30 in float32 (ψ² overflows float32): two steps on either path; ema_gz equals float64's —
    inv_fwd²·Σx² = N·ψ²/(ψ² + eps), not inf·0 = NaN (which then made every later ∂x NaN). The second
    step's ∂x is only checked finite: its term x·(k·inv_fwd·inv_bwd) needs a factor ~1e-60, below float32."""
    torch.manual_seed(8)
    xs = [torch.randn(64, C) * 1e30 for _ in range(2)]
    gys = [torch.randn(64, C) for _ in range(2)]
    got, _ = _runs(be, _module(torch.float32, num_groups=None, warmup_iters=4), xs, gys)
    want, _ = _runs(be, _module(torch.float32, num_groups=None, warmup_iters=4).double(),
                    [x.double() for x in xs], [g.double() for g in gys])
    for step, (a, b) in enumerate(zip(got, want)):
        for i, (u, v) in enumerate(zip(a, b)):
            if u.is_floating_point() and torch.isfinite(v.float()).all():  # (running_phi ~1e60: inf in float32)
                assert torch.isfinite(u).all()
                if step == 1 and i == 1:
                    continue
                assert torch.allclose(u.double(), v, rtol=1e-4, atol=1e-4 * v.abs().max().item())


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_at_extreme_scales_matches_float64(scale):
    """No GroupScaling: ψ² of |x| ~ 1e30 leaves float32, yet y and ∂x are right (double statistics)."""
    torch.manual_seed(6)
    x, gy = torch.randn(64, C), torch.randn(64, C)
    got = _step(_module(torch.float32, num_groups=None), x * scale, gy)
    want = _step(_module(torch.float32, num_groups=None).double(), x.double() * scale, gy.double())
    for u, v in zip(got, want):
        assert torch.allclose(u.double(), v, rtol=1e-5, atol=1e-5 * v.abs().max().item())


def test_float64_past_the_square_range_matches_the_aten_path():
    """No GroupScaling, float64, |x| ~ 1e160: Σx² leaves double's range; the kernel rescales that column
    (as the ATen path's safe_rstd does) instead of dividing by an infinite ψ² (y = b, ∂x = 0)."""
    torch.manual_seed(7)
    x, gy = torch.randn(64, C, dtype=torch.float64), torch.randn(64, C, dtype=torch.float64)
    x[:, : C // 2] *= 1e160  # half the columns overflow, half do not
    fast, calls = _runs("auto", _module(torch.float64, num_groups=None), [x], [gy])
    assert ("power_norm", "kernels") in calls
    plain, _ = _runs("eager", _module(torch.float64, num_groups=None), [x], [gy])
    y = fast[0][0]
    assert y[:, : C // 2].abs().amax() > 0.5  # a unit-scale output, not the bias alone
    for u, v in zip(fast[0], plain[0]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    # the plain formula x / sqrt(mean(x²) + eps) per column, times w, plus b, stated with x / max|x|
    m = _module(torch.float64, num_groups=None)
    top = x.abs().amax(0)
    xs = x / top
    want = xs / (xs.square().mean(0) + m.eps / top.square()).sqrt() * m.weight + m.bias
    torch.testing.assert_close(y, want.detach(), rtol=1e-12, atol=1e-12)


def test_opcheck():
    torch.manual_seed(7)
    for groups in (0, 2):
        x, w, b = torch.randn(40, C), torch.rand(C) + 0.5, torch.randn(C)
        phi, ema, it = torch.rand(C) + 0.5, torch.randn(C), torch.tensor([3])
        args = (x.requires_grad_(), w, b, phi, it, ema, groups, 10, False, 1e-5, 1e-5, 0.9)
        torch.library.opcheck(torch.ops.normkit.power_norm.default, args)
        _, rrow, stats = torch.ops.normkit.power_norm(*args)
        bwd_args = (torch.randn(40, C), x.detach(), w, rrow.detach(), stats.detach(), ema, 0.1, groups)
        torch.library.opcheck(torch.ops.normkit.power_norm_backward.default, bwd_args)


def test_compiled_module_uses_the_operator_without_graph_breaks():
    torch._dynamo.reset()
    kw = {"warmup_iters": 2, "num_groups": 2}
    m, ref = _module(torch.float32, **kw), _module(torch.float32, **kw)
    x0 = torch.randn(2, 10, C)
    explained = torch._dynamo.explain(PowerNorm(C, **kw))(x0)
    assert explained.graph_break_count == 0
    assert "normkit.power_norm" in str(explained.graphs[0].graph)  # the kernels, one opaque node
    cm = torch.compile(m, fullgraph=True)
    for _ in range(4):
        x, gy = torch.randn(2, 10, C), torch.randn(2, 10, C)
        for u, v in zip(_step(cm, x, gy), _step(ref, x, gy)):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6)
