"""Region Normalization's C++ kernels (kernels/csrc/region_norm.cpp): the kernel path of RN-B and RN-L
equal to the formulas written here (float64, values and every gradient), gradcheck, the operators'
registrations (opcheck) and autograd, torch.compile without graph breaks, values far from 1, an empty
batch, the saved activations, the fallbacks (eager backend, no kernels) and the baseline ISA copy."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import normkit as nk
from normkit.functional import region_norm as rn_mod
from normkit.functional.region_norm import region_norm_b, region_norm_l
from normkit.kernels import cpu
from normkit.nn import RegionNormB, RegionNormL

pytestmark = pytest.mark.skipif(not cpu.available(), reason="normkit's CPU kernels are not built here")
D = torch.float64


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the forward kernel (so a test knows the kernel path ran)."""
    calls = []
    real = cpu.region_norm_forward
    monkeypatch.setattr(cpu, "region_norm_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def plain_rn(x, m, eps=1e-5, per_sample=False):
    """Each region normalized with its own mean and biased variance, effective eps·count/S_r (masked sums)."""
    dims = tuple(range(2, x.dim())) if per_sample else (0, *range(2, x.dim()))
    count = x[0, 0].numel() if per_sample else x.shape[0] * x[0, 0].numel()
    out = torch.zeros_like(x)
    for r in (m, 1 - m):
        s = r.sum(dims, keepdim=True).clamp_min(1)
        mu = (x * r).sum(dims, keepdim=True) / s
        var = (((x - mu) ** 2) * r).sum(dims, keepdim=True) / s
        out = out + r * (x - mu) / torch.sqrt(var + eps * count / s)
    return out


def plain_rn_b(x, m, p, per_sample=False, masked_bias=False):
    c = lambda t: t.reshape((1, -1) + (1,) * (x.dim() - 2))  # noqa: E731
    r = plain_rn(x, m, per_sample=per_sample)
    y = r * (m * (1 + c(p[0])) + (1 - m) * (1 + c(p[2])))
    return y + (m * c(p[1]) + (1 - m) * c(p[3]) if masked_bias else c(p[1]) + c(p[3]))


def plain_rn_l(x, w_sa, w_g, b_g, w_b, b_b, threshold=0.5, per_sample=False):
    """Official RN_L: sigmoid(conv([mean_c, max_c])) map, threshold mask, spatial affine from two convs
    (torch.max(dim=1): the max's gradient goes to one channel)."""
    pad = w_sa.shape[-1] // 2
    pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)
    s = torch.sigmoid(TF.conv2d(pooled, w_sa, padding=pad))
    m = (s.detach() >= threshold).to(x.dtype)
    return plain_rn(x, m, per_sample=per_sample) * (1 + TF.conv2d(s, w_g, b_g, padding=pad)) + \
        TF.conv2d(s, w_b, b_b, padding=pad)


def _mask(n, h, w, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, h, w, generator=g) < p).to(D)


def _rn_l_params(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [(torch.randn(1, c, k, k, generator=g, dtype=D) * 0.5).requires_grad_() for c in (2, 1, 1)]
    b = [torch.randn(1, generator=g, dtype=D).requires_grad_() for _ in range(2)]
    return w, b


# ---- kernel path == the formulas (float64) --------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("masked_bias", [False, True])
def test_rn_b_kernel_equals_plain_formula_values_and_gradients(per_sample, masked_bias, kernel_calls):
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 5, 7, dtype=D) * 2 + 1).requires_grad_()
    m = _mask(3, 5, 7)
    p = [(torch.randn(4, dtype=D) * 0.5).requires_grad_() for _ in range(4)]
    y = region_norm_b(x, m, *p, per_sample=per_sample, masked_bias=masked_bias)
    assert kernel_calls
    want = plain_rn_b(x, m, p, per_sample, masked_bias)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, *p), g), torch.autograd.grad(want, (x, *p), g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_sample", [False, True])
def test_rn_l_kernel_equals_plain_formula_values_and_gradients(per_sample, kernel_calls):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 6, 7, dtype=D, requires_grad=True)
    w, b = _rn_l_params(3)
    args = (w[0], w[1], b[0], w[2], b[1], 0.5)
    y = region_norm_l(x, *args, per_sample=per_sample)
    assert kernel_calls
    want = plain_rn_l(x, *args, per_sample=per_sample)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    inputs = (x, *w, *b)
    for a, e in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(want, inputs, g, retain_graph=True)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # one input at a time: the ∂x left for the pooling's backward is neither lost nor doubled
    for t in inputs:
        (one,) = torch.autograd.grad(region_norm_l(x, *args, per_sample=per_sample), t, g)
        torch.testing.assert_close(one, torch.autograd.grad(want, t, g, retain_graph=True)[0], rtol=1e-12, atol=1e-12)


def test_rn_l_module_kernel_7x7_and_1d_input():
    torch.manual_seed(2)
    mod = RegionNormL(6).double()
    x = torch.randn(2, 6, 9, 8, dtype=D, requires_grad=True)
    sa = mod.sa
    args = (sa.conv1.weight, sa.gamma_conv.weight, sa.gamma_conv.bias, sa.beta_conv.weight, sa.beta_conv.bias, 0.8)
    y, want = mod(x), plain_rn_l(x, *args)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    params = list(mod.parameters())
    for a, e in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(want, [x, *params], g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    x3 = torch.randn(2, 6, 11, dtype=D)
    torch.testing.assert_close(mod(x3), plain_rn_l(x3.unsqueeze(-1), *args).squeeze(-1), rtol=1e-12, atol=1e-12)


def test_float32_kernel_matches_float64_formula():
    torch.manual_seed(3)
    x = torch.randn(4, 8, 13, 11) * 3 + 2
    m = _mask(4, 13, 11).float()
    p = [torch.randn(8) * 0.5 for _ in range(4)]
    want = plain_rn_b(x.double(), m.double(), [t.double() for t in p])
    torch.testing.assert_close(region_norm_b(x, m, *p).double(), want, rtol=1e-5, atol=1e-5)


def test_empty_region_and_nan_stay_in_their_region():
    x = torch.randn(2, 3, 4, 4, dtype=D)
    ones = torch.ones(2, 1, 4, 4, dtype=D)  # region 0 empty
    torch.testing.assert_close(region_norm_b(x, ones), plain_rn(x, ones), rtol=1e-12, atol=1e-12)
    m = _mask(2, 4, 4)
    m[0, 0, 0, 0], m[0, 0, 0, 1] = 0.0, 1.0
    x[0, 1, 0, 0] = float("nan")  # channel 1, region 0
    y = region_norm_b(x, m)
    inside = m.expand_as(y) == 1
    assert torch.isnan(y[:, 1][~inside[:, 1]]).all()
    assert torch.isfinite(y[inside]).all() and torch.isfinite(y[:, [0, 2]]).all()


# ---- gradcheck, the operators ---------------------------------------------------------------------------


def test_gradcheck_kernel_path(one_thread):
    x = torch.randn(2, 3, 3, 4, dtype=D, requires_grad=True)
    p = [(torch.randn(3, dtype=D) * 0.5).requires_grad_() for _ in range(4)]
    m = _mask(2, 3, 4)
    for ps, mb in ((False, False), (True, True)):
        assert torch.autograd.gradcheck(lambda x_, *q, ps=ps, mb=mb: region_norm_b(x_, m, *q, per_sample=ps,
                                                                                   masked_bias=mb), (x, *p))
    w, b = _rn_l_params(3, seed=4)
    assert torch.autograd.gradcheck(lambda x_, *a: region_norm_l(x_, a[0], a[1], a[3], a[2], a[4], 0.5), (x, *w, *b))
    # double backward replays the official formula
    assert torch.autograd.gradgradcheck(lambda x_, g_: region_norm_b(x_, m, g_), (x, p[0]))


def _op_inputs(maps, per_sample, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=D)
    m = _mask(2, 4, 5, seed=seed)
    gc, bc = torch.randn(3, 2, generator=g, dtype=D), torch.randn(3, 2, generator=g, dtype=D)
    gm = torch.randn(2, 1, 4, 5, generator=g, dtype=D) if maps else None
    bm = torch.randn(2, 1, 4, 5, generator=g, dtype=D) if maps else None
    return x, m, gc, bc, gm, bm, per_sample, 1e-5


def test_operators_pass_opcheck():
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for maps, ps in ((False, False), (True, True)):
        x, m, gc, bc, gm, bm, ps, eps = _op_inputs(maps, ps)
        args = (x.requires_grad_(), m, gc.requires_grad_(), bc.requires_grad_(),
                None if gm is None else gm.requires_grad_(), None if bm is None else bm.requires_grad_(), ps, eps)
        torch.library.opcheck(torch.ops.normkit.region_norm, args, test_utils=utils)
        xd, gcd, gmd = x.detach(), gc.detach(), None if gm is None else gm.detach()
        _, mu, rho = torch.ops.normkit.region_norm(xd, m, gcd, bc.detach(), gmd, None if bm is None else bm.detach(),
                                                   ps, eps)
        bw = (torch.randn_like(xd), xd, m, gcd, gmd, mu, rho, ps, True, not maps, True, maps, maps)
        torch.library.opcheck(torch.ops.normkit.region_norm_backward, bw, test_utils=utils)


def test_operator_autograd_gradcheck_and_double_backward(one_thread):
    for maps, ps in ((False, True), (True, False)):
        x, m, gc, bc, gm, bm, ps, eps = _op_inputs(maps, ps, seed=6)
        ins = [t.requires_grad_() for t in (x, gc, bc, gm, bm) if t is not None]

        def f(*a, m=m, ps=ps, maps=maps):
            return torch.ops.normkit.region_norm(a[0], m, a[1], a[2], a[3] if maps else None,
                                                 a[4] if maps else None, ps, 1e-5)[0]

        assert torch.autograd.gradcheck(f, tuple(ins))
        assert torch.autograd.gradgradcheck(lambda x_, f=f, ins=ins: f(x_, *ins[1:]), (ins[0],))


def test_compile_fullgraph_without_graph_breaks():
    """backend 'auto' under a compiler traces the official formula; 'kernels' keeps the operator where the
    mask is known to be binary (RN-L's threshold; RN-B's mask cannot be checked inside a graph)."""
    torch.manual_seed(7)
    x, m = torch.randn(2, 4, 6, 6), _mask(2, 6, 6).float()
    mb, ml = RegionNormB(4), RegionNormL(4)
    with torch.no_grad():
        for p in mb.parameters():
            p.normal_(0, 0.3)
    want_b, want_l = mb(x, m), ml(x)
    for name in ("auto", "kernels"):
        with nk.set_backend(name):
            for mod, args, want in ((mb, (x, m), want_b), (ml, (x,), want_l)):
                torch._dynamo.reset()
                explained = torch._dynamo.explain(mod)(*args)
                assert explained.graph_break_count == 0, (name, explained.break_reasons)
                if name == "kernels" and mod is ml:
                    assert "normkit.region_norm" in "\n".join(str(g.graph) for g in explained.graphs)
                torch._dynamo.reset()
                xr = args[0].clone().requires_grad_()
                y = torch.compile(mod, backend="aot_eager", fullgraph=True)(xr, *args[1:])
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
                (gx,) = torch.autograd.grad(y.square().sum(), xr)
                xe = args[0].clone().requires_grad_()
                torch.testing.assert_close(gx, torch.autograd.grad(mod(xe, *args[1:]).square().sum(), xe)[0],
                                           rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


# ---- scale, empty batch, saved activations, fallbacks ------------------------------------------------------


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("case", ["b", "b_per_sample", "l"])
def test_far_from_one_matches_float64(case, scale):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    if case == "l":
        mod = RegionNormL(8)
        y, want = mod(x * scale), copy.deepcopy(mod).double()(x.double() * scale)
    else:
        m, ps = _mask(4, 6, 6).float(), case == "b_per_sample"
        y, want = region_norm_b(x * scale, m, per_sample=ps), plain_rn(x.double() * scale, m.double(), per_sample=ps)
    assert torch.isfinite(y).all()
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err
    xs = (x * scale).requires_grad_()  # the gradient stays finite too
    out = mod(xs) if case == "l" else region_norm_b(xs, m, per_sample=case == "b_per_sample")
    (gx,) = torch.autograd.grad(out, xs, torch.randn_like(out))
    assert torch.isfinite(gx).all()


def test_empty_batch():
    """A rank with zero samples: an empty output and empty/zero gradients, no error."""
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    mb, ml = RegionNormB(4), RegionNormL(4)
    for y in (mb(x, torch.zeros(0, 1, 5, 5)), ml(x)):
        assert y.shape == x.shape
        y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or (p.grad == 0).all() for p in (*mb.parameters(), *ml.parameters()))


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("name", ["b", "l"])
def test_kernel_path_saves_one_input(name):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    m = _mask(2, 16, 16).float()
    fn = (lambda: RegionNormB(64)(x, m)) if name == "b" else (lambda: RegionNormL(64)(x))
    nbytes = x.numel() * x.element_size()
    # x itself, plus (N, 1, H, W) maps (the mask, RN-L's γ/β, its convolutions' inputs, the arg-max
    # indices: each 1/C of x, a few of them) and O(N·C) statistics
    assert _saved_bytes(fn) <= 1.25 * nbytes


def test_fallbacks_equal_the_kernel_path(monkeypatch):
    """backend='eager' (the ATen closed form) and no kernels built give the kernel path's values and gradients."""
    torch.manual_seed(8)
    x = torch.randn(3, 4, 6, 5, dtype=D, requires_grad=True)
    m = _mask(3, 6, 5)
    mb, ml = RegionNormB(4).double(), RegionNormL(4).double()
    with torch.no_grad():
        for p in mb.parameters():
            p.normal_(0, 0.3)

    def run():
        yb, yl = mb(x, m), ml(x)
        return [yb, yl, *torch.autograd.grad(yb.sum() + yl.square().sum(), [x, *mb.parameters(), *ml.parameters()])]

    kernel = run()
    with nk.set_backend("eager"):
        eager = run()
    monkeypatch.setattr(rn_mod._ops, "accepts", lambda *a: False)
    monkeypatch.setattr(rn_mod, "_kernels_on", lambda x: False)
    none = run()
    for a, b, c in zip(kernel, eager, none):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


_ISA_SCRIPT = """
import json, sys, torch
from normkit.functional.region_norm import region_norm_b
from normkit.nn import RegionNormL
from normkit.kernels import cpu
torch.manual_seed(0)
x, g = torch.randn(3, 8, 37, 5) * 2 + 0.5, torch.randn(3, 8, 37, 5)
m = (torch.rand(3, 1, 37, 5) < 0.4).float()
out = {"isa": cpu.isa()}
for ps in (False, True):
    xs = x.clone().requires_grad_()
    y = region_norm_b(xs, m, per_sample=ps)
    out[f"b{ps}"] = [t.flatten().tolist() for t in (y, torch.autograd.grad(y, xs, g)[0])]
mod = RegionNormL(8)
xs = x.clone().requires_grad_()
y = mod(xs)
out["l"] = [t.flatten().tolist() for t in (y, *torch.autograd.grad(y, [xs, *mod.parameters()], g))]
"""


def test_every_isa_copy_this_cpu_runs_gives_the_same_results():
    if len(cpu.isas()) == 1 or cpu.isa() == "baseline":
        pytest.skip("this process runs the baseline copy")
    env = {**os.environ, "NORMKIT_CPU_ISA": "baseline", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT + "json.dump(out, sys.stdout)\n"], env=env,
                         capture_output=True, text=True, check=True)
    base, widest = json.loads(res.stdout), {}
    exec(_ISA_SCRIPT, widest)
    widest = widest["out"]
    assert base["isa"] == "baseline"
    for key in ("bFalse", "bTrue", "l"):
        for a, e in zip(widest[key], base[key], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(e), rtol=1e-4, atol=1e-4)
