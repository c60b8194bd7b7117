"""RepBN / PRepBN on normkit's C++ kernels (csrc/rep_batch_norm.cpp, issue 11 item 3) against the plain formulas.

SLAB (Guo et al., ICML 2024, arXiv:2405.11582), tokens x of shape (..., C), rows = all tokens:

  LN(x)      = (x − m_row)/sqrt(v_row + eps_ln) · γ_ln + β_ln          (per-token mean / biased variance)
  RepBN(x)   = (x − μ)/sqrt(σ² + eps) · γ + β + α·x                    (μ, σ²: batch mean / biased variance
                                                                        per channel; eval: running ones)
  PRepBN(x)  = λ·LN(x) + (1 − λ)·RepBN(x),  λ = r0·iter/total_step while mixing
  running_mean ← 0.9·running_mean + 0.1·μ,  running_var ← 0.9·running_var + 0.1·σ²·n/(n − 1)

The kernel path runs with backend "auto" on CPU float32/float64 when the kernels are built; each test
checks that it ran (the autograd node's name) and compares with the formulas written here.
"""

import importlib

import pytest
import torch

from normkit import backend as nk_backend
from normkit.bench.kernels import _saved_bytes as saved_bytes
from normkit.kernels import cpu
from normkit.nn.rep_batch_norm import PRepBN, RepBN

F = importlib.import_module("normkit.functional.rep_batch_norm")  # (normkit.functional re-exports the function)
D = torch.float64
KERNEL_NODE = "_RepBNKernelFnBackward"

pytestmark = pytest.mark.skipif(not cpu.available(), reason="normkit's C++ kernels are not built here")


def ref_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_repbn(x, g, b, a, eps=1e-5, stats=None):
    flat = x.reshape(-1, x.shape[-1])
    if stats is None:
        mu = flat.mean(0)
        var = ((flat - mu) ** 2).mean(0)
    else:
        mu, var = stats
    return (x - mu) / torch.sqrt(var + eps) * g + b + a * x


def node(y):
    return type(y.grad_fn.next_functions[0][0]).__name__


def mixing_prepbn(c, lam_calls=3, total=10, dtype=D, seed=0):
    """A PRepBN with random parameters, ``lam_calls`` training calls into its schedule (λ = 1 − calls/total)."""
    torch.manual_seed(seed)
    m = PRepBN(c, total_step=total, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        m.norm2.bn.running_mean.normal_()
        m.norm2.bn.running_var.uniform_(0.5, 1.5)
    m.iter.fill_(total - lam_calls)
    return m


def prepbn_ref(m, x):
    ln, rep = m.norm1, m.norm2
    lam = float(m.current_lambda(D))
    return lam * ref_ln(x, ln.weight, ln.bias, ln.eps) + (1 - lam) * ref_repbn(x, rep.bn.weight, rep.bn.bias, rep.alpha)


# ---- exactness against the plain formulas (float64, 1e-12) -----------------------------------------


@pytest.mark.parametrize("lam_calls", [3, 10])  # λ = 0.7 (mixing); λ = 0 (RepBN alone, no LN terms)
def test_prepbn_kernel_forward_backward_and_running_stats_equal_plain_formula(lam_calls):
    m = mixing_prepbn(24, lam_calls)
    x = (torch.randn(5, 29, 24, dtype=D) * 2 + 3).requires_grad_()  # 145 rows: 32 row blocks of 4-5 rows
    bn = m.norm2.bn
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    ref = prepbn_ref(m, x)
    y = m(x)
    assert node(y) == KERNEL_NODE
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    params = [x, *m.parameters()]
    for got, want in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy, allow_unused=True)):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-12, atol=1e-12)
    flat = x.detach().reshape(-1, 24)
    torch.testing.assert_close(bn.running_mean, 0.9 * rm + 0.1 * flat.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 * rv + 0.1 * flat.var(0), rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_repbn_kernel_equals_plain_formula(training, affine):
    torch.manual_seed(1)
    m = RepBN(12, affine=affine, dtype=D).train(training)
    with torch.no_grad():
        m.alpha.fill_(0.6)
        if affine:
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 1.5)
    rm, rv = m.bn.running_mean.clone(), m.bn.running_var.clone()
    x = (torch.randn(7, 11, 12, dtype=D) - 4).requires_grad_()
    g = m.bn.weight if affine else 1.0
    b = m.bn.bias if affine else 0.0
    ref = ref_repbn(x, g, b, m.alpha, stats=None if training else (rm, rv))
    y = m(x)
    assert node(y) == KERNEL_NODE
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    params = [x, *m.parameters()]
    for got, want in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if training:
        flat = x.detach().reshape(-1, 12)
        torch.testing.assert_close(m.bn.running_mean, 0.9 * rm + 0.1 * flat.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.bn.running_var, 0.9 * rv + 0.1 * flat.var(0), rtol=1e-12, atol=1e-12)


def test_kernel_gradcheck_and_double_backward():
    """float64 gradcheck of the kernels' closed-form backward (PRepBN mixing, RepBN train/eval) and
    gradgradcheck of the double backward (autograd replayed on the plain formula)."""
    torch.manual_seed(2)
    c = 4
    x = torch.randn(2, 3, c, dtype=D, requires_grad=True)
    ln_w, ln_b, bn_w, bn_b = (torch.randn(c, dtype=D, requires_grad=True) for _ in range(4))
    alpha = torch.tensor([0.4], dtype=D, requires_grad=True)
    lam = torch.tensor(0.35, dtype=D)

    def mix(x, ln_w, ln_b, bn_w, bn_b, alpha):
        y = F.prepbn_mix_fused(x, ln_w, ln_b, bn_w, bn_b, alpha, lam, torch.zeros(c, dtype=D),
                               torch.ones(c, dtype=D), 0.1, 1e-6, 1e-5)
        assert node(y) == KERNEL_NODE
        return y

    args = (x, ln_w, ln_b, bn_w, bn_b, alpha)
    assert torch.autograd.gradcheck(mix, args)
    assert torch.autograd.gradgradcheck(mix, args)
    rm, rv = torch.randn(c, dtype=D), torch.rand(c, dtype=D) + 0.5
    for training in (True, False):
        def rep(x, w, b, a, training=training):
            y = F.rep_batch_norm(x, rm.clone(), rv.clone(), w, b, a, training=training)
            assert node(y) == KERNEL_NODE
            return y

        assert torch.autograd.gradcheck(rep, (x, bn_w, bn_b, alpha))
        assert torch.autograd.gradgradcheck(rep, (x, bn_w, bn_b, alpha))


# ---- float32: statistics, overflow, NaN, determinism, saved activations -----------------------------


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_kernel_statistics_match_float64(offset):
    """The one-read variance is taken about the mean of the first rows in double: at |μ| = 1000σ it stays
    on the kernel path and within float32 rounding of the float64 statistics."""
    torch.manual_seed(0)
    m = RepBN(16)
    x = torch.randn(8, 128, 16) + offset
    y = m(x.requires_grad_())
    assert node(y) == KERNEL_NODE
    flat = x.detach().double().reshape(-1, 16)
    torch.testing.assert_close(m.bn.running_mean.double(), 0.1 * flat.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.bn.running_var.double(), 0.9 + 0.1 * flat.var(0), rtol=1e-6, atol=1e-6)


def test_ill_conditioned_channel_falls_back_to_welford():
    """A channel whose first rows sit far from the batch mean (μ_shift² > 4σ² in float64) declines the
    one-read variance: ATen's Welford statistics, the kernels' output and backward, exact."""
    x = torch.randn(256, 4, dtype=D)
    x[:16, 0] += 1e4  # the first 16 rows of channel 0 far away: shifted mean² = 15·σ²
    x.requires_grad_()
    rm, rv = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    _, _, _, ok = cpu.prepbn_stats(x.detach(), False, 0.0)
    assert not ok
    y = F.rep_batch_norm(x, rm, rv, None, None, torch.ones(1, dtype=D), training=True)
    assert node(y) == KERNEL_NODE
    torch.testing.assert_close(y, ref_repbn(x, 1.0, 0.0, 1.0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.detach().var(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("which", ["repbn", "prepbn"])
def test_float32_scaled_input_matches_float64(scale, which):
    torch.manual_seed(3)
    m = RepBN(8) if which == "repbn" else mixing_prepbn(8, dtype=torch.float32)
    md = RepBN(8, dtype=D) if which == "repbn" else mixing_prepbn(8, dtype=D)
    md.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    x = torch.randn(4, 9, 8) * scale
    x.requires_grad_()
    xd = x.detach().double().requires_grad_()
    y, yd = m(x), md(xd)
    assert node(y) == KERNEL_NODE
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-5 * yd.abs().max().item())
    gy = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, gy)
    gxd, = torch.autograd.grad(yd, xd, gy.double())
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx.double(), gxd, rtol=1e-4, atol=1e-5 * gxd.abs().max().item())
    # running_var: inf only where the true value exceeds float32
    want = md.bn.running_var if which == "repbn" else md.norm2.bn.running_var
    got = m.bn.running_var if which == "repbn" else m.norm2.bn.running_var
    finite = want.abs() < torch.finfo(torch.float32).max
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-5, atol=0.0)
    assert torch.isinf(got[~finite]).all()


def test_nan_token_stays_nan_and_other_layers_unaffected():
    m = mixing_prepbn(8, dtype=torch.float32)
    x = torch.randn(2, 6, 8)
    x[0, 1, 3] = float("nan")
    y = m(x)
    assert torch.isnan(y[0, 1]).all()  # never masked (the batch statistics are NaN: every token is)


def test_result_does_not_depend_on_thread_count():
    """The per-channel sums run over 32 fixed row blocks added in order: bitwise the same at 1 and 2 threads."""
    torch.manual_seed(4)
    x = torch.randn(64, 1024, 64, requires_grad=True)  # 4M elements: past the one-thread grain
    gy = torch.randn_like(x)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = mixing_prepbn(64, dtype=torch.float32, seed=5)
            y = m(x)
            outs.append((y, *torch.autograd.grad(y, [x, *m.parameters()], gy), m.norm2.bn.running_var.clone()))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_kernel_path_saves_one_input():
    x = torch.randn(4, 64, 32, requires_grad=True)
    for m in (RepBN(32), mixing_prepbn(32, dtype=torch.float32)):
        y = m(x)
        assert node(y) == KERNEL_NODE
        assert saved_bytes(lambda m=m: m(x)) <= x.numel() * 4 + 8 * (2 * 256 + 8 * 32)


# ---- the other paths ------------------------------------------------------------------------------


def test_without_kernels_the_aten_path_gives_the_same_answer(monkeypatch):
    m = mixing_prepbn(6)
    m_ref = mixing_prepbn(6)
    r, r_ref = RepBN(6, dtype=D), RepBN(6, dtype=D)
    x = torch.randn(3, 5, 6, dtype=D, requires_grad=True)
    y_k, yr_k = m(x), r(x)
    assert node(y_k) == node(yr_k) == KERNEL_NODE
    monkeypatch.setattr(nk_backend, "_cpu_kernels_available", lambda: False)
    y_a, yr_a = m_ref(x), r_ref(x)
    assert node(y_a) == "_PRepBNMixFnBackward" and node(yr_a) == "_RepBNFnBackward"
    torch.testing.assert_close(y_k, y_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(yr_k, yr_a, rtol=1e-12, atol=1e-12)
    for a, b in ((m, m_ref), (r, r_ref)):
        for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12, msg=k)


def test_native_backend_and_masks_keep_their_paths():
    x = torch.randn(2, 5, 6, dtype=D)
    assert node(RepBN(6, dtype=D, backend="native")(x.requires_grad_())) == "_RepBNFnBackward"
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y = RepBN(6, dtype=D)(x, mask)
    assert node(y) != KERNEL_NODE


# ---- the operators (torch.ops.normkit.rep_batch_norm_*) ----------------------------------------------


def _op_mix(x, ln_w, ln_b, bn_w, bn_b, alpha, lam=0.4):
    rm, rr, col, ok = torch.ops.normkit.rep_batch_norm_stats(x.detach(), True, 1e-6)
    return torch.ops.normkit.rep_batch_norm_mix(
        x, ln_w, ln_b, bn_w, bn_b, alpha, lam, col[0], col[1], rm, rr, True, 1e-6, 1e-5
    )


def _op_inputs(c=6, rows=10):
    torch.manual_seed(6)
    x = (torch.randn(rows, c, dtype=D) + 2).requires_grad_()
    return x, *(torch.randn(c, dtype=D, requires_grad=True) for _ in range(4)), torch.tensor([0.3], dtype=D,
                                                                                            requires_grad=True)


def test_operators_equal_plain_formula_and_pass_opcheck():
    inputs = _op_inputs()
    x, ln_w, ln_b, bn_w, bn_b, alpha = inputs
    y = _op_mix(*inputs)
    ref = 0.4 * ref_ln(x, ln_w, ln_b, 1e-6) + 0.6 * ref_repbn(x, bn_w, bn_b, alpha)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(ref, inputs, gy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rm, rr, col, ok = torch.ops.normkit.rep_batch_norm_stats(x.detach(), True, 1e-6)
    assert float(ok) == 1.0
    torch.library.opcheck(torch.ops.normkit.rep_batch_norm_stats, (x.detach(), True, 1e-6))
    torch.library.opcheck(torch.ops.normkit.rep_batch_norm_stats, (x.detach(), False, 0.0))
    torch.library.opcheck(
        torch.ops.normkit.rep_batch_norm_mix, (x, ln_w, ln_b, bn_w, bn_b, alpha, 0.4, col[0], col[1], rm, rr, True,
                                               1e-6, 1e-5))
    torch.library.opcheck(  # RepBN alone in eval: running statistics, no LayerNorm terms
        torch.ops.normkit.rep_batch_norm_mix, (x, None, None, bn_w, bn_b, alpha, 0.0, col[0], col[1] + 0.5, None,
                                               None, False, 0.0, 1e-5))
    torch.library.opcheck(
        torch.ops.normkit.rep_batch_norm_mix_backward, (gy, x.detach(), ln_w.detach(), bn_w.detach(), alpha.detach(),
                                                        0.4, col[0], col[1], rm, rr, True, 1e-5))


def test_operators_compile_fullgraph_without_graph_breaks():
    inputs = _op_inputs()
    explain = torch._dynamo.explain(_op_mix)(*inputs)
    assert explain.graph_break_count == 0
    compiled = torch.compile(_op_mix, fullgraph=True, backend="aot_eager")
    y, want = compiled(*inputs), _op_mix(*inputs)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for got, ref in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(want, inputs, gy)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_layers_compile_fullgraph_without_graph_breaks():
    """Under torch.compile the layers keep their traced formula (the kernels run in eager code only)."""
    x = torch.randn(2, 5, 8)
    for m in (RepBN(8), mixing_prepbn(8, dtype=torch.float32)):
        assert torch._dynamo.explain(m)(x).graph_break_count == 0
