"""EvoNorm-B0/S0's C++ kernels (kernels/csrc/evonorm.cpp): the operators' registrations (opcheck), the
kernel path and the ATen closed form both equal to the equations written here (float64), gradcheck
through the operators' autograd, odd shapes, compile with backend="kernels", and every ISA copy."""

import json
import os
import subprocess
import sys

import pytest
import torch

import normkit as nk
from normkit import backend as _backend
from normkit.functional.evonorm import evonorm_b0, evonorm_s0
from normkit.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="normkit's CPU kernels are not built here")
D = torch.float64


def _c(p, x):
    return p.reshape((1, -1) + (1,) * (x.dim() - 2))


def _var(x, dims):
    return ((x - x.mean(dims, keepdim=True)) ** 2).mean(dims, keepdim=True)


def ref_b0(x, w, b, v, running_var=None, eps=1e-5):
    """TF resnet_model.evonorm (B0): x / max(sqrt(Var_B + eps), v·x + sqrt(Var_I + eps)) · γ + β."""
    sp = tuple(range(2, x.dim()))
    vb = _var(x, (0, *sp)) if running_var is None else _c(running_var, x)
    den = torch.maximum(torch.sqrt(vb + eps), _c(v, x) * x + torch.sqrt(_var(x, sp) + eps))
    return x / den * _c(w, x) + _c(b, x)


def ref_s0(x, groups, w, b, v, eps=1e-5):
    """TF resnet_model.evonorm (S0): x·sigmoid(v·x) / sqrt(Var_group + eps) · γ + β."""
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    std = torch.sqrt(_var(xg, (2,)) + eps).expand_as(xg).reshape(x.shape)
    return x * torch.sigmoid(_c(v, x) * x) / std * _c(w, x) + _c(b, x)


def _inputs(shape, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.5 + 0.3
    w, b, v = ((torch.rand(c, generator=g, dtype=dtype) + 0.5) for _ in range(3))
    v = v - 0.9  # v of both signs
    return x, w, b, v


def _ran_kernel(fn) -> bool:
    with _backend.record() as calls:
        fn()
    return ("evonorm", "kernels") in calls


# (name, layer call f(x, w, b, v), equation ref(x, w, b, v))
CASES = {
    "b0_train": (lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True), lambda x, w, b, v: ref_b0(x, w, b, v)),
    "b0_eval": (
        lambda x, w, b, v: evonorm_b0(x, torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype), w, b, v, False),
        lambda x, w, b, v: ref_b0(x, w, b, v, torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype)),
    ),
    "s0_g2": (lambda x, w, b, v: evonorm_s0(x, 2, w, b, v), lambda x, w, b, v: ref_s0(x, 2, w, b, v)),
    "s0_g1": (lambda x, w, b, v: evonorm_s0(x, 1, w, b, v), lambda x, w, b, v: ref_s0(x, 1, w, b, v)),
    "s0_inst": (lambda x, w, b, v: evonorm_s0(x, x.shape[1], w, b, v), lambda x, w, b, v: ref_s0(x, x.shape[1], w, b, v)),
}
SHAPES = [(3, 4, 5, 6), (2, 6, 1), (1, 4, 7), (2, 4, 3, 2, 5), (5, 2, 4100)]  # L = 1, N = 1, 3-D spatial, L > a block


@pytest.mark.parametrize("backend", ["kernels", "native"])  # the C++ kernels; the ATen closed form
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_closed_forms_equal_the_equation_fp64(case, shape, backend):
    fast, ref = CASES[case]
    x, *ps = _inputs(shape, seed=len(shape))
    x.requires_grad_()
    ps = [p.requires_grad_() for p in ps]
    with nk.set_backend(backend):
        assert _ran_kernel(lambda: fast(x, *ps)) == (backend == "kernels")
        y = fast(x, *ps)
    want = ref(x, *ps)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, [x, *ps], g), torch.autograd.grad(want, [x, *ps], g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["b0_train", "s0_g2"])
def test_float32_kernels_match_the_equation_in_float64(case):
    fast, ref = CASES[case]
    x, *ps = _inputs((4, 8, 9, 9), seed=3)
    y64 = ref(x, *ps)
    with nk.set_backend("kernels"):
        y = fast(x.float(), *(p.float() for p in ps))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


def test_the_kernels_agree_with_the_aten_closed_form_on_a_larger_float32_input():
    x, w, b, v = (t.float() for t in _inputs((4, 16, 20, 20), seed=9))
    g = torch.randn_like(x)
    for fn in (lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True), lambda x, w, b, v: evonorm_s0(x, 4, w, b, v)):
        outs = []
        for backend in ("kernels", "native"):
            xs = [t.clone().requires_grad_() for t in (x, w, b, v)]
            with nk.set_backend(backend):
                y = fn(*xs)
            outs.append([y, *torch.autograd.grad(y, xs, g)])
        for a, e in zip(*outs):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def _b0_op(x, rv, w, b, v, training):
    return torch.ops.normkit.evonorm_b0(x, rv, w, b, v, training, 1e-5)[0]


def _s0_op(x, w, b, v, groups):
    return torch.ops.normkit.evonorm_s0(x, w, b, v, groups, 1e-5)[0]


def test_operators_pass_opcheck():
    # schema, fake tensors, autograd registration, AOT dispatch (dynamic shapes); float64 (dtype-generic code)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    x, w, b, v = (t.requires_grad_() for t in _inputs((2, 4, 3, 3), seed=5))
    rv = torch.linspace(0.5, 2.0, 4, dtype=D)
    for training in (True, False):
        torch.library.opcheck(torch.ops.normkit.evonorm_b0, (x, rv, w, b, v, training, 1e-5), test_utils=utils)
    torch.library.opcheck(torch.ops.normkit.evonorm_s0, (x, None, None, v, 2, 1e-5), test_utils=utils)
    xd, wd, bd, vd = (t.detach() for t in (x, w, b, v))
    _, _, mean_b, a, mean_i, std_i = torch.ops.normkit.evonorm_b0(xd, None, wd, bd, vd, True, 1e-5)
    g = torch.randn_like(xd)
    torch.library.opcheck(torch.ops.normkit.evonorm_b0_backward,
                          (g, xd, wd, vd, mean_i, std_i, mean_b, a, True, True, False, True), test_utils=utils)
    _, mean, rstd = torch.ops.normkit.evonorm_s0(xd, wd, bd, vd, 2, 1e-5)
    torch.library.opcheck(torch.ops.normkit.evonorm_s0_backward,
                          (g, xd, None, vd, mean, rstd, 2, False, True, True), test_utils=utils)


def test_operator_autograd_gradcheck_and_double_backward():
    x, w, b, v = (t.requires_grad_() for t in _inputs((2, 4, 3, 3), seed=6))
    rv = torch.linspace(0.5, 2.0, 4, dtype=D)
    assert torch.autograd.gradcheck(lambda *a: _b0_op(a[0], None, *a[1:], True), (x, w, b, v))
    assert torch.autograd.gradcheck(lambda *a: _b0_op(a[0], rv, *a[1:], False), (x, w, b, v))
    assert torch.autograd.gradcheck(lambda *a: _s0_op(*a, 2), (x, w, b, v))
    # create_graph=True replays the plain formula: second derivatives equal the equation's
    for op, ref in ((lambda *a: _b0_op(a[0], None, *a[1:], True), ref_b0), (lambda *a: _s0_op(*a, 2),
                                                                           lambda *a: ref_s0(a[0], 2, *a[1:]))):
        outs = []
        for f in (op, ref):
            (gx,) = torch.autograd.grad(f(x, w, b, v).square().sum(), x, create_graph=True)
            outs.append(torch.autograd.grad(gx.sin().sum(), [x, w, v]))
        for a, e in zip(*outs):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_compile_with_kernels_backend_keeps_the_operators_without_graph_breaks():
    def make():
        return torch.nn.Sequential(nk.EvoNormB0(8), nk.EvoNormS0(8, num_groups=4))

    x = torch.randn(2, 8, 4, 4)
    with nk.set_backend("kernels"):
        explained = torch._dynamo.explain(make())(x)
        assert explained.graph_break_count == 0
        code = "\n".join(str(g.graph) for g in explained.graphs)
        assert "normkit.evonorm_b0" in code and "normkit.evonorm_s0" in code
        torch._dynamo.reset()
        model, xr = make(), x.clone().requires_grad_()
        y = torch.compile(model, backend="aot_eager", fullgraph=True)(xr)  # the operators' autograd, traced
        (gx,) = torch.autograd.grad(y.sum(), xr)
    ref_model, xe = make(), x.clone().requires_grad_()
    with nk.set_backend("eager"):
        ye = ref_model(xe)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, torch.autograd.grad(ye.sum(), xe)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[0].running_var, ref_model[0].running_var)


_ISA_SCRIPT = """
import json, sys, torch
import normkit as nk
from normkit.functional.evonorm import evonorm_b0, evonorm_s0
from normkit.kernels import cpu
torch.manual_seed(0)
x, g = torch.randn(3, 8, 37, 5) * 2 + 0.5, torch.randn(3, 8, 37, 5)
w, b, v = torch.rand(8) + 0.5, torch.rand(8), torch.rand(8) - 0.5
out = {"isa": cpu.isa()}
with nk.set_backend("kernels"):
    for name, fn in (("b0", lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True)),
                     ("s0", lambda x, w, b, v: evonorm_s0(x, 4, w, b, v))):
        xs = [t.clone().requires_grad_() for t in (x, w, b, v)]
        y = fn(*xs)
        out[name] = [t.flatten().tolist() for t in (y, *torch.autograd.grad(y, xs, g))]
"""


def test_every_isa_copy_this_cpu_runs_gives_the_same_results():
    """The baseline (SSE2) copy, with its own vectorized exp and floor, against the copy this process runs
    (the widest; the avx512 copy is checked where the CPU has it)."""
    if len(cpu.isas()) == 1 or cpu.isa() == "baseline":
        pytest.skip("this process runs the baseline copy")
    env = {**os.environ, "NORMKIT_CPU_ISA": "baseline", "OMP_NUM_THREADS": "1"}
    script = _ISA_SCRIPT + "json.dump(out, sys.stdout)\n"
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    base, widest = json.loads(res.stdout), {}
    exec(_ISA_SCRIPT, widest)  # the same computation in this process (the widest copy)
    widest = widest["out"]
    assert base["isa"] == "baseline" and widest["isa"] == cpu.isas()[-1]
    for key in ("b0", "s0"):
        for a, e in zip(widest[key], base[key], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(e), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{widest['isa']} vs baseline, {key}: {m}")
