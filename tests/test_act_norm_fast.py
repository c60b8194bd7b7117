"""The closed-form default paths of EvoNorm-B0/S0, FRN(+TLU) and GRN (normkit.functional._closed_form):
equal to the equations written out here, exact backwards (gradcheck), what they save, values far from 1,
double backward, compile, and EvoNorm-B0 synchronized through a bare reducer."""

import pytest
import torch

import normkit as nk
from normkit.bench.kernels import _saved_bytes  # the `saved` column of `normkit kernels`
from normkit.functional._closed_form import FAST_MIN_NUMEL
from normkit.functional.evonorm import evonorm_b0, evonorm_s0
from normkit.functional.response_norm import filter_response_norm, global_response_norm
from normkit.kernels import cpu

D = torch.float64


@pytest.fixture(autouse=True)
def _closed_form():
    """The closed-form path at the tests' small sizes ("auto" takes it from FAST_MIN_NUMEL elements on)."""
    with nk.set_backend("kernels"):
        yield


def _c(p, x):
    return p.reshape((1, -1) + (1,) * (x.dim() - 2))


def _var(x, dims):
    return ((x - x.mean(dims, keepdim=True)) ** 2).mean(dims, keepdim=True)


# --- the equations, written out (official code: TF resnet_model.evonorm, FRN paper, ConvNeXt-V2 GRN) ---


def ref_b0(x, w, b, v, eps=1e-5, running_var=None):
    sp = tuple(range(2, x.dim()))
    vb = _var(x, (0, *sp)) if running_var is None else _c(running_var, x)
    den = torch.maximum(torch.sqrt(vb + eps), _c(v, x) * x + torch.sqrt(_var(x, sp) + eps))
    return x / den * _c(w, x) + _c(b, x)


def ref_s0(x, groups, w, b, v, eps=1e-5):
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    std = torch.sqrt(_var(xg, (2,)) + eps).expand_as(xg).reshape(x.shape)
    return x * torch.sigmoid(_c(v, x) * x) / std * _c(w, x) + _c(b, x)


def ref_frn(x, w, b, tau, eps=1e-6):
    nu2 = (x * x).mean(tuple(range(2, x.dim())), keepdim=True)
    y = x / torch.sqrt(nu2 + eps) * _c(w, x) + _c(b, x)
    return y if tau is None else torch.maximum(y, _c(tau, x))


def ref_grn(x, w, b, eps=1e-6):  # channels-first
    gx = torch.sqrt((x * x).sum(tuple(range(2, x.dim())), keepdim=True))
    return _c(w, x) * (x * (gx / (gx.mean(1, keepdim=True) + eps))) + _c(b, x) + x


def _params(c, k, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(c, generator=g, dtype=dtype) + 0.5) * (1 if i else 1) for i in range(k)]


# each case: (name, fast call f(x, *params), reference ref(x, *params), number of per-channel params)
CASES = {
    "b0_train": (lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True), lambda x, w, b, v: ref_b0(x, w, b, v), 3),
    "b0_eval": (
        lambda x, w, b, v: evonorm_b0(x, torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype), w, b, v, False),
        lambda x, w, b, v: ref_b0(x, w, b, v, running_var=torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype)), 3),
    "s0": (lambda x, w, b, v: evonorm_s0(x, 2, w, b, v), lambda x, w, b, v: ref_s0(x, 2, w, b, v), 3),
    "frn_tlu": (lambda x, w, b, t: filter_response_norm(x, w, b, t - 1.0),
                lambda x, w, b, t: ref_frn(x, w, b, t - 1.0), 3),
    "frn": (lambda x, w, b: filter_response_norm(x, w, b), lambda x, w, b: ref_frn(x, w, b, None), 2),
    "grn": (lambda x, w, b: global_response_norm(x, w, b), lambda x, w, b: ref_grn(x, w, b), 2),
    "grn_nhwc": (
        lambda x, w, b: global_response_norm(x.permute(0, 2, 3, 1).contiguous(), w, b, channels_last=True)
        .permute(0, 3, 1, 2),
        lambda x, w, b: ref_grn(x, w, b), 2),
}


def _x(shape=(3, 4, 5, 6), seed=1, dtype=D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.5 + 0.3
    return x


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_the_equation_fp64(case):
    fast, ref, k = CASES[case]
    x = _x().requires_grad_()
    ps = [p.requires_grad_() for p in _params(4, k)]
    y = fast(x, *ps)
    want = ref(x, *ps)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ps], g)
    exp = torch.autograd.grad(want, [x, *ps], g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case):
    fast, _, k = CASES[case]
    x = _x((2, 4, 3, 3), seed=2).requires_grad_()
    ps = [p.requires_grad_() for p in _params(4, k, seed=3)]
    assert torch.autograd.gradcheck(fast, (x, *ps))


@pytest.mark.parametrize("case", ["b0_train", "b0_eval", "s0", "frn_tlu", "grn"])
def test_double_backward(case):
    fast, ref, k = CASES[case]
    x = _x((2, 4, 3, 3), seed=4).requires_grad_()
    ps = [p.requires_grad_() for p in _params(4, k, seed=5)]
    outs = []
    for f in (fast, ref):
        (gx,) = torch.autograd.grad(f(x, *ps).square().sum(), x, create_graph=True)
        outs.append(torch.autograd.grad(gx.sin().sum(), [x, *ps]))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_saves_at_most_two_inputs(case):
    fast, _, k = CASES[case]
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    ps = [p.float().requires_grad_() for p in _params(16, k)]
    nbytes = x.numel() * x.element_size()
    extra = nbytes if case == "grn_nhwc" else 0  # the test's own channels-last copy of x is what it saves
    assert _saved_bytes(lambda: fast(x, *ps)) <= 2 * nbytes + extra + 64 * 1024


# --- values far from 1: x·1e30 and x·1e-30 in float32 give the float64 answer ---


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("backend", ["kernels", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_far_from_one(case, backend, scale):
    fast, ref, k = CASES[case]
    x64 = _x((4, 8, 6, 6), seed=6) * scale
    ps64 = [p.requires_grad_() for p in _params(8, k, seed=7)]
    x64.requires_grad_()
    want = ref(x64, *ps64)
    g = torch.randn_like(want)
    wgx = torch.autograd.grad(want, x64, g)[0]
    x = x64.detach().float().requires_grad_()
    ps = [p.detach().float().requires_grad_() for p in ps64]
    with nk.set_backend(backend):
        y = fast(x, *ps)
        gx = torch.autograd.grad(y, x, g.float())[0]
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err
    gerr = ((gx.double() - wgx).abs().max() / wgx.abs().max()).item()  # the gradients stay right too
    assert gerr < 1e-4, gerr


@pytest.mark.parametrize("case", list(CASES))
def test_nan_input_stays_nan(case):
    fast, _, k = CASES[case]
    x = torch.randn(2, 4, 3, 3)
    x[1, 2, 0, 1] = float("nan")
    y = fast(x, *[p.float() for p in _params(4, k)])
    assert torch.isnan(y[1, 2, 0, 1])


def test_tlu_tie_gives_the_gradient_to_y_as_tf():
    x = torch.zeros(1, 2, 2, 2, dtype=D, requires_grad=True)  # y = β = τ = 0 everywhere: a tie
    w, b, t = torch.ones(2, dtype=D), torch.zeros(2, dtype=D, requires_grad=True), torch.zeros(2, dtype=D, requires_grad=True)
    y = filter_response_norm(x, w, b, t)
    gb, gt = torch.autograd.grad(y.sum(), [b, t])
    assert torch.equal(gb, torch.full((2,), 4.0, dtype=D)) and torch.equal(gt, torch.zeros(2, dtype=D))


def test_b0_running_var_on_the_fast_path():
    m = nk.EvoNormB0(4, unbiased_running_var=True)
    x = torch.randn(3, 4, 5, 5)
    m(x)
    n = 3 * 25
    want = 0.9 + 0.1 * _var(x.double(), (0, 2, 3)).reshape(4) * n / (n - 1)
    torch.testing.assert_close(m.running_var.double(), want, rtol=1e-6, atol=1e-6)


def test_b0_sync_with_a_bare_reducer_is_exact():
    calls = []

    def reducer(t):  # a one-process "all_reduce": counts the calls
        calls.append(t.numel())
        return t

    x = _x((3, 4, 5, 5), seed=8).requires_grad_()
    w, b, v = (p.requires_grad_() for p in _params(4, 3))
    rv1, rv2 = torch.ones(4, dtype=D), torch.ones(4, dtype=D)
    y = evonorm_b0(x, rv1, w, b, v, True, reducer=reducer, unbiased_running_var=True)
    # a bare reducer keeps no shift memory: the exact two-pass form, (n, Σx per channel) then Σ(x − mean)²
    # (a module's reducer: one packed collective in steady state, tests/test_distributed.py)
    assert calls == [4 + 1, 4]
    want = evonorm_b0(x, rv2, w, b, v, True, unbiased_running_var=True)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv1, rv2, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, [x, w, v], g), torch.autograd.grad(want, [x, w, v], g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_compile_fullgraph_no_graph_breaks():
    mods = [nk.EvoNormB0(8), nk.EvoNormS0(8, num_groups=4), nk.FilterResponseNorm(8), nk.GlobalResponseNorm(8)]
    model = torch.nn.Sequential(*mods)
    x = torch.randn(2, 8, 4, 4)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0


def test_without_affine_parameters():
    x = _x().requires_grad_()
    v = _params(4, 1)[0].requires_grad_()
    one, zero = torch.ones(4, dtype=D), torch.zeros(4, dtype=D)
    pairs = [
        (evonorm_b0(x, None, None, None, v, True), ref_b0(x, one, zero, v)),
        (evonorm_s0(x, 2, None, None, v), ref_s0(x, 2, one, zero, v)),
        (filter_response_norm(x, None, None, zero), ref_frn(x, one, zero, zero)),
        (global_response_norm(x), ref_grn(x, one, zero)),
    ]
    for y, want in pairs:
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, [x, v], g, allow_unused=True, materialize_grads=True),
                        torch.autograd.grad(want, [x, v], g, allow_unused=True, materialize_grads=True)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["b0_train", "s0", "frn_tlu", "grn"])
def test_paths_taken(case):
    fast, _, k = CASES[case]
    node = {"b0_train": "_B0Fn", "s0": "_S0Fn", "frn_tlu": "_TLUFn", "grn": "_GRNFn"}[case]
    ps = [p.float().requires_grad_() for p in _params(8, k)]

    def taken(x, backend):
        with nk.set_backend(backend):
            fn = fast(x, *ps).grad_fn
        for _ in range(3):  # through the reshape/permute views around the function
            if node in type(fn).__name__:
                return True
            fn = fn.next_functions[0][0]
        return False

    small = torch.randn(2, 8, 4, 4, requires_grad=True)
    big = torch.randn(2, 8, 64, 64, requires_grad=True)  # FAST_MIN_NUMEL elements
    assert big.numel() == FAST_MIN_NUMEL
    # with normkit's C++ kernels EvoNorm's "auto" takes the closed form at any size (cheaper than the plain formula)
    small_auto = case in ("b0_train", "s0") and cpu.available()
    assert taken(small, "kernels") and taken(big, "auto") and not taken(big, "eager")
    assert taken(small, "auto") == small_auto
