"""The token zoo's fast paths (issues 11 item 3, 12 item 3): PowerNorm, UnifiedNorm, RepBN, PRepBN, CRMSNorm.

Each fast path (one autograd Function with a closed-form backward, or ATen's op plus C-sized folds)
is checked against the plain formula restated here in float64, for its saved activations, and at
inputs scaled by 1e30 / 1e-30 against the float64 answer (ScaleNorm / ScaleNorm2d too). Plain formulas:

  CRMSNorm   y = x / sqrt((Σx² + (Σx)²)/d + eps) · w + b,  d = width + 1
  RepBN      y = (x − μ)/sqrt(σ² + eps) · γ + β + α·x        (batch statistics over all tokens)
  PRepBN     y = λ·LN(x) + (1 − λ)·RepBN(x)
  PowerNorm  xs = x / sqrt(mean_group(x²) + 1e-5);  z = xs / sqrt(mean_tokens(xs²) + eps);  y = w·z + b
             backward: ĝ = ∂L/∂y·w − (1 − α_bkw)·ema·z;  ema += mean(ĝ·z);  ∂L/∂xs = ĝ / sqrt(ψ² + eps)
  UN         z = x / sqrt(mean_tokens(x²) + eps);  y = w·z + b                 (first steps: r = 1, no window)
             backward: g = ∂L/∂y·w;  gz = mean(g·z);  ema ← m·ema + (1 − m)·gz;  ∂L/∂x = (g − ema·z) / sqrt(x2 + eps)
"""

import copy

import pytest
import torch

from normkit.bench.kernels import _saved_bytes as saved_bytes  # what `normkit kernels` reports as "saved"
from normkit.functional.crms_norm import crms_norm
from normkit.functional.rep_batch_norm import rep_batch_norm
from normkit.nn.crms_norm import CRMSNorm
from normkit.nn.pointwise import ScaleNorm, ScaleNorm2d
from normkit.nn.power_norm import PowerNorm
from normkit.nn.rep_batch_norm import PRepBN, RepBN
from normkit.nn.unified_norm import UnifiedNorm

D = torch.float64


def ref_crms(x, w, b, eps=1e-5):
    d = x.shape[-1] + 1
    y = x / torch.sqrt(((x * x).sum(-1, keepdim=True) + x.sum(-1, keepdim=True) ** 2) / d + eps)
    return y * w + b


def ref_repbn(x, g, b, a, eps=1e-5):
    flat = x.reshape(-1, x.shape[-1])
    mu = flat.mean(0)
    var = ((flat - mu) ** 2).mean(0)
    return (x - mu) / torch.sqrt(var + eps) * g + b + a * x


def ref_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gs(x, groups, eps=1e-5):
    xg = x.reshape(*x.shape[:-1], groups, -1)
    return (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + eps)).reshape(x.shape)


def _rand_affine(c, dtype=D):
    return (torch.rand(c, dtype=dtype) + 0.5).requires_grad_(), torch.randn(c, dtype=dtype).requires_grad_()


# ---- CRMSNorm ------------------------------------------------------------------------------------


def test_crms_fast_path_equals_plain_formula_and_gradchecks():
    x = torch.randn(3, 4, 7, dtype=D, requires_grad=True)
    w, b = _rand_affine(7)
    y = crms_norm(x, w, b, backend="kernels")  # the closed form at any size ("auto": from 64K elements)
    assert "CRMSNormFn" in type(y.grad_fn.next_functions[0][0]).__name__
    ref = ref_crms(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    xs = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    ws, bs = _rand_affine(5)
    fast = lambda x, w=None, b=None: crms_norm(x, w, b, backend="kernels")  # noqa: E731
    assert torch.autograd.gradcheck(fast, (xs, ws, bs))
    assert torch.autograd.gradcheck(fast, (xs,))
    assert torch.autograd.gradgradcheck(fast, (xs, ws, bs))


def test_crms_saves_only_the_input():
    x = torch.randn(64, 31, requires_grad=True)
    m = CRMSNorm(31, elementwise_affine=True, bias=True, backend="kernels")
    assert saved_bytes(lambda: m(x)) <= x.numel() * 4 + 4 * 64 * 8 + 2 * 31 * 4


# ---- RepBN / PRepBN ------------------------------------------------------------------------------


def test_repbn_fast_path_equals_plain_formula_gradchecks_and_double_backward():
    x = torch.randn(3, 5, 4, dtype=D, requires_grad=True)
    g_, b_ = _rand_affine(4)
    a = torch.tensor([0.7], dtype=D, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    y = rep_batch_norm(x, rm, rv, g_, b_, a, training=True)
    assert type(y.grad_fn).__name__ == "ViewBackward0" and "RepBN" in type(y.grad_fn.next_functions[0][0]).__name__
    ref = ref_repbn(x, g_, b_, a)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, g_, b_, a], gy), torch.autograd.grad(ref, [x, g_, b_, a], gy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    flat = x.detach().reshape(-1, 4)
    torch.testing.assert_close(rm, 0.1 * flat.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.9 + 0.1 * flat.var(0), rtol=1e-12, atol=1e-12)  # unbiased (n − 1)
    args = (x, g_, b_, a)
    train = lambda x, g, b, a: rep_batch_norm(x, None, None, g, b, a, training=True)  # noqa: E731
    assert torch.autograd.gradcheck(train, args)
    assert torch.autograd.gradgradcheck(train, args)
    rm2, rv2 = torch.randn(4, dtype=D), torch.rand(4, dtype=D) + 0.5
    ev = lambda x, g, b, a: rep_batch_norm(x, rm2, rv2, g, b, a, training=False)  # noqa: E731
    assert torch.autograd.gradcheck(ev, args)


@pytest.mark.parametrize("training", [True, False])
def test_repbn_blocked_column_sums_equal_plain_formula(training):
    """256 rows: the statistics and the backward's column sums run in 4 blocks of rows."""
    x = torch.randn(4, 64, 5, dtype=D, requires_grad=True)
    g_, b_ = _rand_affine(5)
    a = torch.tensor([0.3], dtype=D, requires_grad=True)
    rm, rv = torch.randn(5, dtype=D), torch.rand(5, dtype=D) + 0.5
    y = rep_batch_norm(x, rm.clone(), rv.clone(), g_, b_, a, training=training)
    if training:
        ref = ref_repbn(x, g_, b_, a)
    else:
        ref = (x - rm) / torch.sqrt(rv + 1e-5) * g_ + b_ + a * x
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, g_, b_, a], gy), torch.autograd.grad(ref, [x, g_, b_, a], gy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_repbn_float32_batch_statistics_match_float64(offset):
    """Σx and Σx² in one read where |μ| ≤ 2σ; at |μ| = 1000σ (E[x²] − μ² would cancel ~20 bits) the
    exact Welford statistics instead: both within float32 rounding of the float64 answer."""
    torch.manual_seed(0)
    x = torch.randn(8, 128, 16) + offset
    rm, rv = torch.zeros(16), torch.ones(16)
    y = rep_batch_norm(x, rm, rv, None, None, torch.zeros(1), training=True)
    xd = x.double()
    flat = xd.reshape(-1, 16)
    if offset == 0:  # (at 1000σ the output's own float32 rounding of x − μ dominates, as in torch's BN)
        torch.testing.assert_close(y.double(), ref_repbn(xd, 1.0, 0.0, 0.0), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rm.double(), 0.1 * flat.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * flat.var(0), rtol=1e-5, atol=1e-6)


def test_column_sums_equal_plain_sums():
    from normkit.functional._closed_form import column_sums

    for rows in (7, 256):  # one block; 4 blocks of rows
        a, b, k = torch.randn(rows, 5, dtype=D), torch.randn(rows, 5, dtype=D), torch.randn(5, dtype=D)
        for shift in (None, k):
            got = column_sums(a, b, shift)
            want = (a * (b - (0 if shift is None else shift))).sum(0), a.sum(0)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        sq, _ = column_sums(a.t().contiguous().t(), a)  # a strided input: one block
        torch.testing.assert_close(sq, (a * a).sum(0), rtol=1e-12, atol=1e-12)
    empty = column_sums(torch.zeros(0, 3), torch.zeros(0, 3))
    assert all(t.shape == (3,) and not t.any() for t in empty)


def test_repbn_and_prepbn_save_at_most_two_inputs():
    x = torch.randn(4, 64, 32, requires_grad=True)
    for m in (RepBN(32), PRepBN(32, total_step=10)):
        m.train()
        assert saved_bytes(lambda m=m: m(x)) <= 2 * x.numel() * 4 + 64 * 32


@pytest.mark.parametrize("calls", [0, 2, 10])  # λ = 1 (first call), 0.8, 0 (schedule over)
def test_prepbn_folded_mix_equals_plain_formula(calls):
    m = PRepBN(6, total_step=10, dtype=D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    m.iter.fill_(10 - calls)
    lam = float(m.current_lambda(D))
    x = torch.randn(2, 5, 6, dtype=D, requires_grad=True)
    ref_m = copy.deepcopy(m)
    y = m(x)
    ln, rep = ref_m.norm1, ref_m.norm2
    ref = lam * ref_ln(x, ln.weight, ln.bias, ln.eps) + (1 - lam) * ref_repbn(x, rep.bn.weight, rep.bn.bias, rep.alpha)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    params = [x, *m.parameters()]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, gy, allow_unused=True)
    refs = torch.autograd.grad(ref, [x, *ref_m.parameters()], gy, allow_unused=True)
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, torch.zeros_like(want) if got is None else want, rtol=1e-12, atol=1e-12)


# ---- PowerNorm / UnifiedNorm: the approximate backwards in closed form -------------------------------


@pytest.mark.parametrize("tokens", [4, 64])  # 12 rows; 192 rows: column sums in 4 blocks
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_power_norm_fast_backward_equals_plain_formula(masked, groups, tokens):
    torch.manual_seed(0)
    m = PowerNorm(6, num_groups=groups, warmup_iters=0 if masked else 10, dtype=D)
    with torch.no_grad():
        m.weight.copy_(torch.rand(6) + 0.5)
        m.bias.copy_(torch.randn(6))
        m.ema_gz.copy_(torch.randn(6))
        m.running_phi.copy_(torch.rand(6) + 0.5)
    pad = torch.zeros(3, tokens, dtype=torch.bool)
    if masked:
        pad[1, 2:] = True
    x = torch.randn(3, tokens, 6, dtype=D, requires_grad=True)
    ema0, phi0 = m.ema_gz.clone(), m.running_phi.clone()
    y = m(x, pad)
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [x, m.weight, m.bias], gy)
    # plain formula
    xr = x.detach().requires_grad_()
    xs = ref_gs(xr, groups) if groups else xr
    keep = ~pad.reshape(-1)
    flat = xs.reshape(-1, 6)
    psi2 = (flat[keep].detach() ** 2).mean(0)
    denom = psi2 if not masked else phi0  # warmup_iters=0: the previous running value
    z = flat.detach() / torch.sqrt(denom + 1e-5)
    ref_y = (m.weight * z + m.bias).reshape(x.shape)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    g = gy.reshape(-1, 6) * m.weight.detach()
    approx = g - 0.1 * ema0 * z
    torch.testing.assert_close(m.ema_gz, ema0 + (approx * z).mean(0), rtol=1e-12, atol=1e-12)
    gxs = approx / torch.sqrt(psi2 + 1e-5)
    (ref_gx,) = torch.autograd.grad(flat, [xr], gxs)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, (gy.reshape(-1, 6) * z).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gy.reshape(-1, 6).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", [4, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_unified_norm_fast_backward_equals_plain_formula(masked, tokens):
    m = UnifiedNorm(6, dtype=D)
    with torch.no_grad():
        m.weight.copy_(torch.rand(6) + 0.5)
        m.bias.copy_(torch.randn(6))
        m.ema_gz.copy_(torch.randn(6))
    pad = torch.zeros(3, tokens, dtype=torch.bool)
    if masked:
        pad[0, 1:] = True
    x = torch.randn(3, tokens, 6, dtype=D, requires_grad=True)
    ema0 = m.ema_gz.clone()
    y = m(x, pad)
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [x, m.weight, m.bias], gy)
    flat, keep = x.detach().reshape(-1, 6), ~pad.reshape(-1)
    x2 = (flat[keep] ** 2).mean(0)
    z = flat / torch.sqrt(x2 + 1e-5)
    torch.testing.assert_close(y, (m.weight * z + m.bias).reshape(x.shape), rtol=1e-12, atol=1e-12)
    g = gy.reshape(-1, 6) * m.weight.detach()
    gz = (g * z).mean(0)  # over all tokens, padded ones included (official)
    ema = 0.9 * ema0 + 0.1 * gz  # step 1: no window yet
    torch.testing.assert_close(m.ema_gz, ema, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx.reshape(-1, 6), (g - ema * z) / torch.sqrt(x2 + 1e-5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, (gy.reshape(-1, 6) * z).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gy.reshape(-1, 6).sum(0), rtol=1e-12, atol=1e-12)


def test_power_and_unified_norm_save_at_most_two_inputs():
    x = torch.randn(4, 64, 32, requires_grad=True)
    for m in (PowerNorm(32), PowerNorm(32, num_groups=None), UnifiedNorm(32)):
        assert saved_bytes(lambda m=m: m(x)) <= 2 * x.numel() * 4 + 8192  # + per-token / per-channel statistics


# ---- overflow: x · 1e30 and x · 1e-30 against float64 --------------------------------------------


def _layers():
    return {
        "crmsnorm": lambda: CRMSNorm(8, elementwise_affine=True, bias=True),  # plain formula ("auto", small)
        "crmsnorm_fast": lambda: CRMSNorm(8, elementwise_affine=True, bias=True, backend="kernels"),
        "repbn_no_shortcut": lambda: RepBN(8, alpha_init=0.0),  # BN part alone (α·x would hide it)
        "prepbn_mixed": lambda: PRepBN(8, total_step=4, r0=0.5),
        "prepbn_warm": lambda: PRepBN(8, warm=2),
        "powernorm": lambda: PowerNorm(8),
        "powernorm_no_gs": lambda: PowerNorm(8, num_groups=None),
        "unifiednorm": lambda: UnifiedNorm(8),
        "scalenorm": lambda: ScaleNorm(8),
        "scalenorm2d": lambda: ScaleNorm2d(8),
    }


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", list(_layers()))
def test_scaled_inputs_match_float64(name, train, scale):
    torch.manual_seed(0)
    m = _layers()[name]()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.rand_like(p) * 0.5)
    m.train(train)
    md = copy.deepcopy(m).double()
    x = (torch.randn(4, 8, 3, 3) if name == "scalenorm2d" else torch.randn(4, 5, 8)) * scale
    x.requires_grad_()
    xd = x.detach().double().requires_grad_()
    y, yd = m(x), md(xd)
    assert torch.isfinite(y).all()
    err = ((y.double() - yd).abs().max() / yd.abs().max()).item()
    assert err < 1e-5, (name, err)
    if name in ("crmsnorm", "crmsnorm_fast", "scalenorm", "scalenorm2d"):  # closed-form backwards keep O(1) intermediates
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, [x], gy)
        (gxd,) = torch.autograd.grad(yd, [xd], gy.double())
        assert ((gx.double() - gxd).abs().max() / gxd.abs().max()).item() < 1e-5


def test_nan_stays_nan_and_inf_gives_nan():
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    for backend in ("auto", "kernels"):
        x[1, 3] = float("nan")
        y = crms_norm(x, backend=backend)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
        x[1, 3] = float("inf")  # IEEE on the formula: x / sqrt(inf) = 0, inf / inf = NaN (as F.rms_norm)
        y = crms_norm(x, backend=backend)
        assert torch.isnan(y[1, 3]) and (y[1, [0, 1, 2, 4, 5, 6, 7]] == 0).all()
    m = PowerNorm(8)
    x = torch.randn(2, 4, 8)
    x[0, 0, 0] = float("nan")
    assert torch.isnan(m(x)).any()
