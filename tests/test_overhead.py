"""Per-call overhead of the core norms on the default backend (issue 11): the modules' precomputed fast
paths (``normkit.nn._base.FastPath``) call ATen's op (or the plain expression) with no more Python than
torch's own module, and fall back to the full path whenever the configuration, the backend, the input or
an open ``record()`` asks for it. Expected values are written out as plain torch formulas."""

import pickle
import sys
import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normkit
from normkit import backend as B
from normkit.backend import record


def _python_calls(fn) -> int:
    """Python function calls made while running ``fn`` (after one warm-up call)."""
    fn()
    calls = Counter()

    def prof(frame, event, arg):
        if event == "call":
            calls[frame.f_code] += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return sum(calls.values())


class _PlainScaleNorm(nn.Module):  # what a user writes without normkit (the benchmark's baseline)
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(c**0.5))

    def forward(self, x):
        return x * (self.scale / x.norm(dim=-1, keepdim=True).clamp_min(1e-5))


class _PlainDyT(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias


def _pairs():
    """(name, torch's module or the plain code as a module, normkit's module, input) at the issue's small shapes."""
    tok, img = torch.randn(64, 256), torch.randn(8, 64, 14, 14)
    ln, rms = nn.LayerNorm(256), nn.RMSNorm(256, eps=1e-6)
    return [
        ("layernorm", ln, normkit.LayerNorm(256), tok),
        ("layernorm_tiny", nn.LayerNorm(64), normkit.LayerNorm(64), torch.randn(2, 16, 64)),
        ("rmsnorm", rms, normkit.RMSNorm(256, eps=1e-6), tok),
        ("groupnorm", nn.GroupNorm(32, 64), normkit.GroupNorm(64, 32), img),
        ("batchnorm", nn.BatchNorm2d(64), normkit.BatchNorm2d(64), img),
        ("scalenorm", _PlainScaleNorm(256), normkit.ScaleNorm(256), tok),
        ("dyt", _PlainDyT(256), normkit.DyT(256), tok),
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", _pairs(), ids=[p[0] for p in _pairs()])
def test_forward_makes_no_more_python_calls_than_torch(case, grad):
    name, theirs, ours, x = case
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        n_torch = _python_calls(lambda: theirs(x))
        n_ours = _python_calls(lambda: ours(x))
    # torch's module: _wrapped_call_impl, _call_impl, forward, F.<op> (+ its helpers); normkit's: the first
    # three and ATen's op
    assert n_ours <= n_torch, (name, n_ours, n_torch)


def test_forward_add_makes_no_more_python_calls_than_add_then_layernorm():
    x, r = torch.randn(64, 256), torch.randn(64, 256)
    ln, ours = nn.LayerNorm(256), normkit.LayerNorm(256)
    n_torch = _python_calls(lambda: (ln(x + r), x + r))
    n_ours = _python_calls(lambda: ours.forward_add(x, r))
    assert n_ours <= n_torch


def test_fast_paths_compute_the_formulas():
    torch.manual_seed(0)
    x = torch.randn(6, 32, dtype=torch.float64) * 3 + 1
    w, b = torch.rand(32, dtype=torch.float64) + 0.5, torch.randn(32, dtype=torch.float64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)

    ln = normkit.LayerNorm(32, dtype=torch.float64)
    rms = normkit.RMSNorm(32, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b), rms.weight.copy_(w)
    torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 1e-5) * w + b)
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    y, s = ln.forward_add(x, 2 * x)
    torch.testing.assert_close(s, 3 * x)
    torch.testing.assert_close(y, (3 * x - 3 * mu) / torch.sqrt(9 * var + 1e-5) * w + b)

    sn = normkit.ScaleNorm(32, dtype=torch.float64)
    torch.testing.assert_close(sn(x), 32**0.5 * x / x.norm(dim=-1, keepdim=True))
    dyt = normkit.DyT(32, alpha_init=0.7, dtype=torch.float64)
    torch.testing.assert_close(dyt(x), torch.tanh(0.7 * x))

    img = torch.randn(4, 8, 3, 5, dtype=torch.float64)
    gn = normkit.GroupNorm(8, 2, dtype=torch.float64)
    g = img.reshape(4, 2, -1)
    want = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape(img.shape)
    torch.testing.assert_close(gn(img), want)


def test_batchnorm_fast_path_keeps_torchs_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    for momentum in (0.1, None):
        ours, theirs = normkit.BatchNorm2d(4, momentum=momentum), nn.BatchNorm2d(4, momentum=momentum)
        for _ in range(3):  # momentum=None: the cumulative average 1 / num_batches_tracked
            torch.testing.assert_close(ours(x * 2 + 1), theirs(x * 2 + 1))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(x), theirs(x))
        # the unbiased running variance, written out: (1 - m)^k · 1 + ... for momentum 0.1 after 3 steps
    m = normkit.BatchNorm2d(4)
    m(x)
    torch.testing.assert_close(m.running_var, 0.9 * torch.ones(4) + 0.1 * x.var((0, 2, 3), unbiased=True))


def test_fast_paths_keep_normkits_errors():
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 8\), got \(3, 7\)"):
        normkit.LayerNorm(8)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="channels"):
        normkit.GroupNorm(8, 2)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normkit.BatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="more than 1 value per"):
        normkit.GroupNorm(4, 4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expects input of shape"):
        normkit.ScaleNorm(8)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="DyT expects"):
        normkit.DyT(8)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="BatchNorm2d expected 4D"):
        normkit.BatchNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        normkit.LayerNorm(8).forward_add(torch.randn(3, 8), torch.randn(8))
    n = normkit.BatchNorm2d(4)
    with pytest.raises(ValueError):
        n(torch.randn(2, 5, 3, 3))
    assert int(n.num_batches_tracked) == 0  # a rejected call leaves the counter alone


def test_plan_follows_option_changes():
    x = torch.randn(4, 16)
    m = normkit.LayerNorm(16)
    with record() as calls:
        m(x)
    assert calls == [("layer_norm", "native")]
    m.backend = "eager"  # an attribute assignment re-plans
    assert m._nk_below == 0
    with record() as calls:
        m(x)
    assert ("normalize", "eager") in calls
    m.backend = None
    assert m._nk_below > 0
    m.weight_offset = 1.0  # a normkit-only option: the full path, y = x̂ · (1 + w) + b
    assert m._nk_below == 0
    xh = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(m(x), xh * (1 + m.weight) + m.bias)

    r = normkit.RMSNorm(16)
    assert r._nk_below > 0
    r.bias = nn.Parameter(torch.full((16,), 0.5))  # ATen's RMSNorm has no bias
    assert r._nk_below == 0
    torch.testing.assert_close(r(x), TF.rms_norm(x, (16,), r.weight) + 0.5)
    r.register_parameter("bias", None)
    assert r._nk_below > 0

    d = normkit.DyT(16)
    d.bias = None
    assert d._nk_below == 0
    torch.testing.assert_close(d(x), torch.tanh(0.5 * x))


def test_plan_survives_pickling_and_copies():
    m = normkit.RMSNorm(16, eps=1e-6)
    for clone in (pickle.loads(pickle.dumps(m)), __import__("copy").deepcopy(m)):
        assert clone._nk_below == m._nk_below > 0
        clone.backend = "eager"
        assert clone._nk_below == 0 and m._nk_below > 0
    old = pickle.loads(pickle.dumps(m))
    del old.__dict__["_nk_below"]  # a module pickled before the plan existed: planned again on load
    assert pickle.loads(pickle.dumps(old))._nk_below == m._nk_below
    older = normkit.LayerNorm(16)
    for name in ("_nk_below", "reduction_dims"):  # pickled before reduction_dims existed: loads, full path
        del older.__dict__[name]
    assert pickle.loads(pickle.dumps(older))._nk_below == 0


def test_global_backend_and_record_disable_the_fast_path():
    x = torch.randn(4, 16, requires_grad=True)
    m = normkit.LayerNorm(16)
    assert B.thread_plain()
    with normkit.set_backend("eager"):
        assert not B.thread_plain()
        with record() as calls:
            m(x).sum().backward()
        assert ("normalize", "eager") in calls
    assert B.thread_plain()
    with record():
        assert not B.thread_plain()
    assert B.thread_plain()
    # another thread's setting is its own
    seen = []
    with normkit.set_backend("eager"):
        t = threading.Thread(target=lambda: seen.append((B.get_backend(), B.thread_plain())))
        t.start()
        t.join()
    assert seen == [("auto", True)]


def test_large_inputs_still_take_the_checked_and_kernel_paths():
    # the fast path stops where "auto" picks normkit's kernels or ATen's statistics are checked for overflow
    from normkit.functional.aten import ATEN_CHECK_MIN_NUMEL

    assert normkit.LayerNorm(8)._nk_below == ATEN_CHECK_MIN_NUMEL
    assert normkit.RMSNorm(8)._nk_below == B.AUTO_RULES["rms_norm"].min_numel
    assert normkit.GroupNorm(8, 2)._nk_below == ATEN_CHECK_MIN_NUMEL
    assert normkit.DyT(8)._nk_below == B.AUTO_RULES["dyt"].min_numel
    assert normkit.ScaleNorm(8)._nk_below == B.AUTO_RULES["scale_norm"].min_numel
    assert normkit.LayerNorm(8, backend="native")._nk_below == ATEN_CHECK_MIN_NUMEL
    assert normkit.BatchNorm2d(8, stats_dtype=torch.float64)._nk_below == 0
    assert normkit.BatchNorm(8, channels_last=True)._nk_below == 0
    assert normkit.GhostBatchNorm(8)._nk_below == 0  # its own _forward
    x = torch.full((1, 1 << 18), 3e19)  # past float32's variance range: ATen's op alone would return zeros
    x[0, ::2] = -3e19
    y = normkit.LayerNorm(1 << 18, elementwise_affine=False)(x)
    torch.testing.assert_close(y.abs(), torch.ones_like(y), rtol=1e-4, atol=1e-4)


def test_batch_renorm_takes_the_closed_form_from_the_threshold():
    """Below backend.CLOSED_FORM_MIN_NUMEL Batch Renorm runs its ATen path, from it the per-sample closed form;
    both equal Ioffe 2017's Algorithm 1 written out (r, d constants for backprop)."""
    from normkit.nn.batch_variants import BatchRenorm

    def ref(x, rm, rv, w, b, eps=1e-5):
        m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        s_b, s = torch.sqrt(v + eps), torch.sqrt(rv + eps)
        r = torch.clamp(s_b / s, 1 / 1.5, 1.5).detach()
        d = torch.clamp((m - rm) / s, -0.5, 0.5).detach()
        c = lambda t: t.reshape(1, -1, 1, 1)  # noqa: E731
        return ((x - c(m)) / c(s_b) * c(r) + c(d)) * c(w) + c(b)

    torch.manual_seed(0)
    for n, fast in ((2, False), (B.CLOSED_FORM_MIN_NUMEL // (4 * 32 * 32), True)):
        m = BatchRenorm(4, schedule=False, r_max=1.5, d_max=0.5).double()
        with torch.no_grad():
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
        x = (torch.randn(n, 4, 32, 32, dtype=torch.float64) * 2 + 0.7).requires_grad_()
        want = ref(x, m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias)
        with record() as calls:
            got = m(x)
        assert (("sample_moments", "aten") in calls) == fast, (n, calls)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(x)
        for a, b in zip(torch.autograd.grad(got, [x, m.weight], g), torch.autograd.grad(want, [x, m.weight], g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("center", [True, False], ids=["layernorm2d", "rmsnorm2d"])
def test_channels_first_fast_path_computes_the_formula(center):
    """From the table's size (16K elements) LayerNorm2d / RMSNorm2d go straight to the kernels: the per-position
    norm over C written out, gradients included; a wrong channel count still raises normkit's error."""
    torch.manual_seed(0)
    x = (torch.randn(2, 32, 16, 16, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    m = normkit.LayerNorm2d(32, eps=1e-6) if center else normkit.RMSNorm2d(32, eps=1e-6)
    m = m.double()
    assert x.numel() >= m._nk_cf_from
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    xc = x - x.mean(1, keepdim=True) if center else x
    want = xc / torch.sqrt(xc.pow(2).mean(1, keepdim=True) + 1e-6) * m.weight.reshape(1, -1, 1, 1)
    if center:
        want = want + m.bias.reshape(1, -1, 1, 1)
    got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(x)
    for a, b in zip(torch.autograd.grad(got, [x, m.weight], g), torch.autograd.grad(want, [x, m.weight], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="expects 32 channels"):
        m(torch.randn(2, 31, 16, 16, dtype=torch.float64))
    m.weight_offset = 0.5  # a normkit-only option: the full path
    assert m._nk_cf_from == B.UNBOUNDED
