"""normkit's C++ CPU kernels (the "compiled" backend on CPU) against the plain formulas.

Shapes are chosen to reach every code path of csrc/cpu_norms.cpp: rows longer than a 4096-value
block and not a multiple of the 32 partial-sum lanes, channels-first chunks of 256 positions
with a tail, fewer tasks than threads, GroupNorm/InstanceNorm segments.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import reference as ref
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
from normkit import backend as B
from normkit import functional as F
from normkit.kernels import cpu, normalize

# Skipped only when the kernels are switched off on purpose. A machine that merely lacks a C++
# compiler fails every test here, so CI cannot go green without having tested the kernels.
pytestmark = pytest.mark.skipif(
    os.environ.get("NORMKIT_CPU_KERNELS", "1") == "0", reason="CPU kernels disabled by NORMKIT_CPU_KERNELS=0"
)


@pytest.fixture(autouse=True, scope="module")
def _kernels_must_be_available():
    if not cpu.available():
        pytest.fail(
            f"{cpu.status()}; install a C++ compiler (or point $NORMKIT_CXX at one), "
            "or set NORMKIT_CPU_KERNELS=0 to skip these tests deliberately",
            pytrace=False,
        )

D = torch.float64


def _params(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)


# name -> (ours(x, w, b, backend), float64 formula(x, w, b), torch's own fp32 op or None, shape)
CASES = {
    "layer_norm": (lambda x, w, b, be: F.layer_norm(x, x.shape[-1], w, b, backend=be),
                   lambda x, w, b: ref.layer_norm(x, w, b),
                   lambda x, w, b: TF.layer_norm(x, x.shape[-1:], w, b), (37, 5000)),
    "rms_norm": (lambda x, w, b, be: F.rms_norm(x, x.shape[-1], w, 1e-6, bias=b, backend=be),
                 lambda x, w, b: ref.rms_norm(x, w, 1e-6, b),
                 lambda x, w, b: TF.rms_norm(x, x.shape[-1:], w, 1e-6) + b, (64, 1000)),
    "layer_norm2d": (lambda x, w, b, be: F.layer_norm2d(x, w, b, backend=be),
                     lambda x, w, b: ref.layer_norm2d(x, w, b),
                     lambda x, w, b: TF.layer_norm(x.movedim(1, -1), x.shape[1:2], w, b).movedim(-1, 1), (3, 24, 17, 31)),
    "rms_norm2d": (lambda x, w, b, be: F.rms_norm2d(x, w, 1e-6, bias=b, backend=be),
                   lambda x, w, b: ref.rms_norm2d(x, w, 1e-6) + b.reshape(1, -1, 1),
                   lambda x, w, b: TF.rms_norm(x.movedim(1, -1), x.shape[1:2], w, 1e-6).movedim(-1, 1) + b.reshape(1, -1, 1),
                   (1, 16, 600)),
    "layer_norm2d_wide": (lambda x, w, b, be: F.layer_norm2d(x + 10, w, b, backend=be),  # sums down 4096 channels
                          lambda x, w, b: ref.layer_norm2d(x + 10, w, b),
                          lambda x, w, b: TF.layer_norm((x + 10).movedim(1, -1), x.shape[1:2], w, b).movedim(-1, 1),
                          (2, 4096, 40)),
    "layer_norm_far_mean": (lambda x, w, b, be: F.layer_norm(x * 0.01 + 300, x.shape[-1], w, b, backend=be),
                            # mean/std = 1.5e4: the single-pass float statistics must not cancel
                            lambda x, w, b: ref.layer_norm(x * 0.01 + 300, w, b),
                            lambda x, w, b: TF.layer_norm(x * 0.01 + 300, x.shape[-1:], w, b), (16, 777)),
    "group_norm": (lambda x, w, b, be: F.group_norm(x, 4, w, b, backend=be),
                   lambda x, w, b: ref.group_norm(x, 4, w, b),
                   lambda x, w, b: TF.group_norm(x, 4, w, b), (3, 12, 9, 11)),
    "instance_norm": (lambda x, w, b, be: F.instance_norm(x, weight=w, bias=b, backend=be),
                      lambda x, w, b: ref.instance_norm(x, w, b),
                      lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), (2, 5, 70, 70)),
    "dyt": (lambda x, w, b, be: F.dyt(x, torch.tensor([0.8]), w, b, backend=be),
            lambda x, w, b: ref.dyt(x, torch.tensor([0.8], dtype=D), w, b),
            lambda x, w, b: torch.tanh(0.8 * x) * w + b, (40, 3000)),
    "dyt_channels_first": (lambda x, w, b, be: F.dyt(x, torch.tensor([0.8]), w, b, channels_last=False, backend=be),
                           lambda x, w, b: torch.tanh(0.8 * x) * w.reshape(1, -1, 1) + b.reshape(1, -1, 1),
                           lambda x, w, b: torch.tanh(0.8 * x) * w.reshape(1, -1, 1) + b.reshape(1, -1, 1), (3, 7, 301)),
}


def _channels(name, shape):
    """Size of the dim the affine runs along: the last for token norms, dim 1 for the others."""
    return shape[-1] if name in ("layer_norm", "layer_norm_far_mean", "rms_norm", "dyt") else shape[1]


def _grads(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), g))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_forward_and_backward_within_twice_torchs_error(name):
    ours, formula, theirs, shape = CASES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    g = torch.randn(shape, generator=gen)
    w, b = _params(_channels(name, shape))
    exact = _grads(formula, x.double(), w.double(), b.double(), g.double())
    mine = _grads(lambda *a: ours(*a, "compiled"), x, w, b, g)
    torch_ = _grads(theirs, x, w, b, g)
    for what, e, m, t in zip(("y", "dx", "dw", "db"), exact, mine, torch_):
        scale = max(1.0, e.abs().max().item())
        err_m = (m.double() - e).abs().max().item()
        err_t = (t.double() - e).abs().max().item()
        assert err_m <= 2 * err_t + 1e-6 * scale, (what, err_m, err_t)


def test_compiled_backend_runs_the_cpu_kernels_not_inductor(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Inductor was used")

    monkeypatch.setattr(B, "compiled", boom)
    calls = []
    for name in ("seg_forward", "seg_backward", "cf_forward", "cf_backward", "dyt_forward", "dyt_backward"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, real=real, name=name, **k: (calls.append(name), real(*a, **k))[1])
    for name, (ours, _, _, shape) in CASES.items():
        x = torch.randn(shape, requires_grad=True)
        w, b = (p.requires_grad_() for p in _params(_channels(name, shape)))
        ours(x, w, b, "compiled").sum().backward()
    F.add_norm(torch.randn(4, 8), torch.randn(4, 8), 8, backend="compiled")
    assert set(calls) == {"seg_forward", "seg_backward", "cf_forward", "cf_backward", "dyt_forward", "dyt_backward"}


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_add_norm_residual_in_the_kernel(norm):
    x, r, g = torch.randn(3, 6, 130), torch.randn(3, 6, 130), torch.randn(3, 6, 130)
    w, b = _params(130)
    out = {}
    for be in ("eager", "compiled"):
        xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
        y, s = F.add_norm(xs, rs, 130, ws, bs, norm=norm, backend=be)
        assert torch.equal(s, x + r)  # the sum is formed once, exactly
        grads = torch.autograd.grad((y * g).sum() + (s * s).sum(), (xs, rs, ws, bs))
        out[be] = (y, *grads)
    for a, c in zip(out["eager"], out["compiled"]):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_statistics_returned_by_the_kernel_path():
    x = torch.randn(6, 3, 5, 7, dtype=D)
    for dims, view in (((2, 3), (6, 3, 5, 7)), ((2,), (6, 1, 15, 7)), ((2,), (42, 1, 15, 1))):
        xv = x.reshape(view)
        for center in (True, False):
            y, mean, var = normalize(xv, None, None, dims, center=center, backend="compiled")
            if center:
                want_var, want_mean = torch.var_mean(xv, dims, correction=0, keepdim=True)
            else:
                want_mean, want_var = torch.zeros_like(xv.mean(dims, keepdim=True)), xv.square().mean(dims, keepdim=True)
            torch.testing.assert_close(mean, want_mean)
            torch.testing.assert_close(var, want_var)
            assert not mean.requires_grad and not var.requires_grad


def test_thread_count_does_not_change_the_result_beyond_rounding():
    x, g = torch.randn(512, 300), torch.randn(512, 300)
    w, b = _params(300)
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            res.append(_grads(lambda *a: F.layer_norm(a[0], 300, a[1], a[2], backend="compiled"), x, w, b, g))
    finally:
        torch.set_num_threads(old)
    for a, c in zip(*res):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)


def test_nan_propagates_and_stays_in_its_row():
    x = torch.randn(4, 50)
    x[1, 7] = float("nan")
    w, b = _params(50)
    for fn in (lambda t: F.layer_norm(t, 50, w, b, backend="compiled"), lambda t: F.rms_norm(t, 50, w, backend="compiled")):
        y = fn(x)
        assert y[1].isnan().all() and torch.isfinite(y[[0, 2, 3]]).all()
    y = F.dyt(x, torch.tensor([0.5]), w, b, backend="compiled")
    assert y[1, 7].isnan() and torch.isfinite(y).sum() == x.numel() - 1
    xc = torch.randn(2, 4, 300)
    xc[0, 2, 299] = float("nan")  # the tail of the last 256-position chunk
    y = F.layer_norm2d(xc, *_params(4), backend="compiled")
    assert y[0, :, 299].isnan().all() and torch.isfinite(y).sum() == y.numel() - 4
    # the backward's column sums see the NaN too
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    F.layer_norm(xg, 50, wg, b, backend="compiled").sum().backward()
    assert wg.grad.isnan().all() and torch.isfinite(xg.grad[[0, 2, 3]]).all()


def test_huge_rows_do_not_overflow_the_sums():
    x = torch.randn(3, 4, 300)
    x[1] *= 1e19  # squares sum past float32's range unless scaled before summing
    w, b = _params(4)
    with normkit.set_backend("eager"):
        want_cf, want_rows = F.layer_norm2d(x, w, b), F.layer_norm(x, 300)
    torch.testing.assert_close(F.layer_norm2d(x, w, b, backend="compiled"), want_cf, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(F.layer_norm(x, 300, backend="compiled"), want_rows, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_and_expanded_gradient():
    base = torch.randn(40, 24, dtype=D)
    x = base.t().requires_grad_()  # (24, 40), not contiguous
    w, b = (p.double().requires_grad_() for p in _params(40))
    F.layer_norm(x, 40, w, b, backend="compiled").sum().backward()  # the incoming gradient has stride 0
    xr = base.t().clone().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref.layer_norm(xr, wr, br).sum().backward()
    for a, c in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(a, c)


def _run(env_extra: dict[str, str]) -> str:
    code = (
        "import warnings, torch, normkit\n"
        "from normkit.kernels import cpu\n"
        "with warnings.catch_warnings(record=True) as ws:\n"
        "    warnings.simplefilter('always')\n"
        "    y = normkit.functional.layer_norm(torch.randn(4, 8), 8, backend='compiled')\n"
        "print(cpu.status()); print(bool(torch.isfinite(y).all()))\n"
        "print(len([w for w in ws if 'CPU kernels' in str(w.message)]))\n"
    )
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_disabled_or_unbuildable_kernels_fall_back_to_inductor(tmp_path):
    off = _run({"NORMKIT_CPU_KERNELS": "0"}).splitlines()
    assert off[0] == "normkit CPU kernels off: disabled by NORMKIT_CPU_KERNELS=0" and off[1] == "True"
    broken = _run({"NORMKIT_CXX": "/bin/false", "NORMKIT_CACHE_DIR": str(tmp_path)}).splitlines()
    assert broken[0].startswith("normkit CPU kernels off: /bin/false failed to build cpu_norms.cpp"), broken
    assert broken[1] == "True" and broken[2] == "1"  # one warning says why, the layer still runs


@pytest.mark.slow
def test_build_goes_to_the_cache_dir_and_is_reused(tmp_path):
    first = _run({"NORMKIT_CACHE_DIR": str(tmp_path)}).splitlines()[0]
    assert first.startswith("normkit CPU kernels on (built in") and str(tmp_path) in first
    assert len(list((tmp_path / "kernels").glob("cpu_norms_*.so"))) == 1
    again = _run({"NORMKIT_CACHE_DIR": str(tmp_path)}).splitlines()[0]
    assert again.startswith("normkit CPU kernels on (loaded from cache")


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5), st.integers(1, 4), st.integers(1, 70), st.sampled_from([1, 2, 31, 256, 300]),
    st.sampled_from(["rows_or_cf", "groups"]), st.booleans(), st.booleans(), st.integers(0, 2**16),
)
def test_kernel_index_math_matches_eager_on_random_layouts(n, g, cg, length, kind, center, affine, seed):
    # every (N, G, Cg, L) the dispatcher sends to the kernels, in float64 against the eager math
    gen = torch.Generator().manual_seed(seed)
    if kind == "rows_or_cf":
        g, dims = 1, (2,)
    else:
        dims = (2, 3)
    x = torch.randn(n, g, cg, length, generator=gen, dtype=D) * 3 + 1
    gy = torch.randn(x.shape, generator=gen, dtype=D)
    w = torch.randn(g * cg, generator=gen, dtype=D) if affine else None
    b = torch.randn(g * cg, generator=gen, dtype=D) if affine else None
    out = {}
    for be in ("eager", "compiled"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        xs, ws, bs = (leaves + [None, None])[:3]
        y, mean, var = normalize(xs, ws, bs, dims, center=center, eps=1e-5, backend=be)
        out[be] = (y, mean, var, *torch.autograd.grad(y, leaves, gy))
    for a, c in zip(out["eager"], out["compiled"]):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-9)


def test_dyt_edge_shapes_and_huge_inputs():
    a = torch.tensor([0.5])
    # a channels-first input needs a channel dim, on every backend
    for be in ("eager", "compiled"):
        with pytest.raises(ValueError, match=r"dyt expects input of shape \(N, C, \*\)"):
            F.dyt(torch.randn(5), a, channels_last=False, backend=be)
    # 2-D channels-first input and a (C, 1, 1) parameter shape: same results and gradient shapes as eager
    for x, w, b, cl in (
        (torch.randn(4, 5), torch.randn(5), torch.randn(5), False),
        (torch.randn(2, 3, 4, 4), torch.randn(3, 1, 1), torch.randn(3, 1, 1), False),
    ):
        out = {}
        for be in ("eager", "compiled"):
            leaves = [t.clone().requires_grad_() for t in (x, a, w, b)]
            y = F.dyt(leaves[0], leaves[1], leaves[2], leaves[3], channels_last=cl, backend=be)
            out[be] = (y, *torch.autograd.grad(y.sin().sum(), leaves))
        for e, c in zip(out["eager"], out["compiled"]):
            assert e.shape == c.shape
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    # past the exp's underflow sech² is exactly 0: nothing leaks into ∂L/∂α = Σ w·sech²·x·g
    x = torch.tensor([[1.0, 1e37]], requires_grad=True)
    grads = [torch.autograd.grad(F.dyt(x, a.clone().requires_grad_(), backend=be).sum(), x)[0] for be in ("eager", "compiled")]
    da = [torch.autograd.grad(F.dyt(x.detach(), (p := a.clone().requires_grad_()), backend=be).sum(), p)[0]
          for be in ("eager", "compiled")]
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(da[1], da[0])


def test_bias_gradient_keeps_the_bias_shape_without_weight():
    x = torch.randn(4, 3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    for be in ("eager", "compiled", "inductor"):
        (gb,) = torch.autograd.grad(F.layer_norm(x, (3, 4), None, b, backend=be).sum(), b)
        assert gb.shape == (3, 4)
        torch.testing.assert_close(gb, torch.full((3, 4), 4.0))


def test_channels_last_memory_format_keeps_its_layout():
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    w, b = _params(8)
    y = F.layer_norm2d(x, w, b, backend="compiled")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref.layer_norm2d(x, w, b))


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "layernorm2d", "groupnorm", "instancenorm", "dyt"])
def test_compiled_backend_layers_trace_without_graph_breaks(name):
    # inside a user's torch.compile region the kernels' math is traced (no opaque ctypes call)
    torch._dynamo.reset()
    m = normkit.registry.sample_norm(name, 8)
    m.backend = "compiled"
    x = torch.randn(4, 8, requires_grad=True) if name in ("layernorm", "rmsnorm", "dyt") else torch.randn(2, 8, 3, 3)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    torch.testing.assert_close(y, m(x))


# --- portable build: one library, a kernel copy per instruction set, chosen at run time ----------

_ISA_SCRIPT = """
import sys, torch
from normkit.kernels import cpu
out = {"isa": cpu.isa(), "status": cpu.status()}
gen = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.float64):
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dt) * scale
    def affine(c):
        return torch.rand(c, generator=gen, dtype=dt) + 0.5, rnd(c)
    x, res, g = rnd(37, 5000, scale=3.0) + 1, rnd(37, 5000), rnd(37, 5000)
    w, b = affine(5000)
    for center in (True, False):  # LayerNorm / RMSNorm rows, with a residual
        y, s, mean, var, rstd = cpu.seg_forward(x, res, w, b, 37, 5000, 1, 1, center, 1e-5)
        dx, dw, db = cpu.seg_backward(g, g, s, w, mean, rstd, 37, 5000, 1, 1, center, True, True)
        out[f"rows_{center}_{dt}"] = (y, s, mean, var, rstd, dx, dw, db)
    x, g = rnd(3, 12, 301), rnd(3, 12, 301)  # GroupNorm, 4 groups of 3 channels
    w, b = affine(12)
    y, s, mean, var, rstd = cpu.seg_forward(x, None, w, b, 12, 3, 301, 4, True, 1e-5)
    out[f"groups_{dt}"] = (y, mean, var, rstd, *cpu.seg_backward(g, None, s, w, mean, rstd, 12, 3, 301, 4, True, True, True))
    x, g = rnd(2, 70, 600), rnd(2, 70, 600)  # channels-first LayerNorm2d / RMSNorm2d
    w, b = affine(70)
    for center in (True, False):
        y, s, mean, var, rstd = cpu.cf_forward(x, w, b, 2, 70, 600, center, 1e-6)
        out[f"cf_{center}_{dt}"] = (y, mean, var, rstd, *cpu.cf_backward(g, s, w, mean, rstd, 2, 70, 600, center, True, True))
    alpha = torch.tensor([0.8], dtype=dt)
    for shape, last in (((40, 3000), True), ((3, 7, 301), False)):  # DyT, both layouts, into saturation
        x, g = rnd(*shape, scale=20.0), rnd(*shape)
        w, b = affine(shape[-1] if last else shape[1])
        y = cpu.dyt_forward(x, alpha, w, b, last)
        out[f"dyt_{last}_{dt}"] = (y, *cpu.dyt_backward(g, x, alpha, w, last, True, True))
torch.save(out, sys.argv[1])
"""


def _isa_run(isa: str, path) -> dict:
    env = {**os.environ, "NORMKIT_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(path)


@pytest.mark.slow
def test_every_isa_this_cpu_runs_matches_the_baseline(tmp_path):
    """Each kernel copy this CPU supports (forced with NORMKIT_CPU_ISA, one process each) gives the
    baseline copy's results within float rounding: only the vector width of a few sums differs."""
    assert cpu.isas()[0] == "baseline" and cpu.isa() == cpu.isas()[-1]  # auto: the widest
    base = _isa_run("baseline", tmp_path / "baseline.pt")
    assert base["isa"] == "baseline" and "baseline code, forced by NORMKIT_CPU_ISA" in base["status"]
    for isa in cpu.isas()[1:]:
        got = _isa_run(isa, tmp_path / f"{isa}.pt")
        assert got["isa"] == isa and f"{isa} code" in got["status"]
        for key, tensors in base.items():
            if key in ("isa", "status"):
                continue
            tol = dict(rtol=1e-5, atol=1e-5) if "float32" in key else dict(rtol=1e-12, atol=1e-12)
            for i, (a, b) in enumerate(zip(got[key], tensors, strict=True)):
                where = f"{isa} vs baseline, {key}[{i}]"
                torch.testing.assert_close(a, b, **tol, msg=lambda m, where=where: f"{where}: {m}")


def test_isa_request_resolution():
    names = ["baseline", "avx2", "avx512"]
    assert cpu._choose_isa("auto", names, names[:2]) == ("avx2", None)
    assert cpu._choose_isa("", names, names) == ("avx512", None)
    assert cpu._choose_isa(" AVX2 ", names, names) == ("avx2", None)
    assert cpu._choose_isa("baseline", names, names) == ("baseline", None)
    isa, warning = cpu._choose_isa("avx512", names, names[:2])  # the CPU lacks it: the widest narrower copy
    assert isa == "avx2" and "does not support it; using avx2" in warning
    isa, warning = cpu._choose_isa("avx2", names, names[:1])
    assert isa == "baseline" and "using baseline" in warning
    isa, warning = cpu._choose_isa("sse9", names, names[:2])  # unknown: the widest, and the valid names
    assert isa == "avx2" and "not one of auto, baseline, avx2, avx512" in warning
    assert cpu._choose_isa("avx512", ["baseline"], ["baseline"])[0] == "baseline"  # aarch64: one copy


@pytest.mark.slow
def test_unavailable_isa_falls_back_with_one_warning():
    """Asking for a copy the CPU (or the library) lacks never fails and never runs it: one warning,
    the widest copy narrower than the one asked for, named in status()."""
    lacking = [n for n in ("avx2", "avx512") if n not in cpu.isas()]
    for request in ["sse9", *lacking]:
        code = (
            "import warnings, torch\n"
            "from normkit.kernels import cpu\n"
            "with warnings.catch_warnings(record=True) as ws:\n"
            "    warnings.simplefilter('always')\n"
            "    y = cpu.dyt_forward(torch.randn(4, 8), torch.tensor([0.5]), None, None, True)\n"
            "print(cpu.isa()); print(cpu.status()); print(bool(torch.isfinite(y).all()))\n"
            "print([str(w.message) for w in ws if 'NORMKIT_CPU_ISA' in str(w.message)])\n"
        )
        env = {**os.environ, "NORMKIT_CPU_ISA": request}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        isa, status, finite, warned = out.stdout.splitlines()
        expected = cpu.isas()[-1]
        assert isa == expected and f"{expected} code, NORMKIT_CPU_ISA={request} not available here" in status
        assert finite == "True" and warned.count("NORMKIT_CPU_ISA") == 1, warned


def _other_cpu(monkeypatch):
    """Make this process look like one on a CPU with other feature flags and another model name."""
    real_open = open

    def fake_open(file, *args, **kwargs):
        if str(file) == "/proc/cpuinfo":
            import io
            return io.StringIO("processor\t: 0\nmodel name\t: Other CPU\nflags\t\t: fpu sse sse2\n")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr("platform.processor", lambda: "other")
    if hasattr(cpu, "_cpu_id"):  # the CPU identity must not reach the key, whichever way it is read
        monkeypatch.setattr(cpu, "_cpu_id", lambda: "flags\t: fpu sse sse2")


def test_cache_key_does_not_depend_on_the_cpu_flags(monkeypatch):
    cxx = cpu._compiler()
    key = cpu._cache_key(cxx, "version")
    _other_cpu(monkeypatch)
    assert cpu._cache_key(cxx, "version") == key
    # what the library does depend on still changes the key
    assert cpu._cache_key(cxx, "another version") != key
    monkeypatch.setattr(cpu, "_MACHINE", "aarch64")
    assert cpu._cache_key(cxx, "version") != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "FLAGS", (*cpu.FLAGS, "-O2"))
    assert cpu._cache_key(cxx, "version") != key


def test_build_cache_survives_a_changed_cpu_flag_set(monkeypatch):
    """The library this process loaded is found again, with no compile, on a 'different' CPU."""
    loaded = cpu._library()._name

    real_popen = subprocess.Popen

    def no_compile(cmd, *args, **kwargs):
        assert "-c" not in cmd and "-shared" not in cmd, f"rebuilt: {cmd}"
        return real_popen(cmd, *args, **kwargs)  # `cxx --version` is fine

    _other_cpu(monkeypatch)
    monkeypatch.setattr(subprocess, "Popen", no_compile)
    assert str(cpu._build(cpu._compiler())) == loaded


@pytest.mark.skipif(cpu._MACHINE not in ("x86_64", "amd64") or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
def test_only_the_wider_copies_contain_wider_instructions():
    """Everything outside the avx2 / avx512 copies (entry points, baseline kernels, library code the
    copies share) is plain x86-64: a build copied to an older CPU cannot hit an illegal instruction
    before (or without) the runtime check."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", cpu._library()._name], capture_output=True,
                         text=True, check=True).stdout
    wide, bad, fn = set(), {}, ""
    for line in asm.splitlines():
        if line.endswith(">:"):
            fn = line
        elif re.search(r"%[yz]mm|%k[0-7]\b|\tv[a-z]", line):  # AVX registers, AVX-512 masks, VEX/EVEX ops
            if "nk_avx2::" in fn or "nk_avx512::" in fn:
                wide.add(fn)
            else:
                bad.setdefault(fn, line)
    assert not bad, bad
    assert any("nk_avx512::" in f for f in wide) and any("nk_avx2::" in f for f in wide)
