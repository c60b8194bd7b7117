"""The fast default paths of the BatchNorm-family zoo layers (Batch Renorm, EstBN, BCN, IBN, AdaB2N):
equal to plain formulas written here (float64, 1e-12), saving at most ~1 input-sized tensor for
backward, and right at ×1e30 / ×1e-30 (float32 vs the float64 formula)."""

import pytest
import torch

from normkit.backend import set_backend
from normkit.functional.batch_variants import sample_affine, sample_moments
from normkit.nn.adab2n import AdaB2N
from normkit.nn.batch_channel_norm import BatchChannelNorm, EstBN
from normkit.nn.batch_variants import BatchRenorm, GhostBatchNorm
from normkit.nn.ibn import IBN

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


def ref_ibn(x, half, w_in, b_in, w_bn, b_bn, eps=1e-5):
    """IBN-Net: InstanceNorm (per sample and channel over the positions) on the first half, BatchNorm on the rest."""
    a, b = x[:, :half], x[:, half:]
    m = a.mean((2, 3), keepdim=True)
    v = ((a - m) ** 2).mean((2, 3), keepdim=True)
    ya = (a - m) / torch.sqrt(v + eps) * _c(w_in) + _c(b_in)
    mb, vb = batch_stats(b)
    return torch.cat([ya, bn(b, mb, vb, w_bn, b_bn, eps)], 1)


def ref_group_part(a, groups, gw, gb, eps=1e-5):
    """BCN step 2: per-sample group normalization with one scale and shift per group."""
    ag = a.reshape(a.shape[0], groups, -1)
    m = ag.mean(-1, keepdim=True)
    v = ((ag - m) ** 2).mean(-1, keepdim=True)
    return ((ag - m) / torch.sqrt(v + eps) * gw.reshape(1, groups, 1) + gb.reshape(1, groups, 1)).reshape(a.shape)


def ref_adab2n(x, ids, task_weight, cur_tasks, w, b, eps=1e-5):
    """AdaB2N's balanced statistics: w_i = π_t(i) / n_t(i), π the Dirichlet-posterior mean over seen tasks."""
    t = torch.arange(task_weight.numel())
    counts = (ids[:, None] == t).sum(0).to(D)
    conc = torch.where(t <= cur_tasks, task_weight.exp() + counts, torch.zeros_like(counts))
    wi = (conc / conc.sum() / counts.clamp_min(1))[ids]
    sm = x.mean((2, 3))
    mu = (wi[:, None] * sm).sum(0)
    var = (wi[:, None] * ((x - _c(mu)) ** 2).mean((2, 3))).sum(0)
    return bn(x, mu, var, w, b, eps)


def _layer(name, c, dtype=D):
    torch.manual_seed(0)
    if name == "batchrenorm":
        m = BatchRenorm(c, schedule=False, r_max=1.5, d_max=0.5)
    elif name == "estbn":
        m = EstBN(c, moving_speed=0.3)
    elif name == "ibn":
        m = IBN(c)
    elif name in ("bcn", "bcn_est"):
        m = BatchChannelNorm(c, 2, estimate=name == "bcn_est")
    elif name == "ghostbn":
        m = GhostBatchNorm(c, virtual_batch_size=2 if c == 4 else 4)
    elif name == "adab2n":
        m = AdaB2N(c, 3, 1, kappa=0.4)
        m.end_task()
        m.end_task()
    else:
        raise AssertionError(name)
    with torch.no_grad():  # drawn in float32, then converted: the float32 and float64 layers are equal
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
        for k, buf in m.named_buffers():
            if k.endswith("running_mean"):
                buf.uniform_(-0.3, 0.3)
            elif k.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return m.to(dtype)


IDS = [0, 1, 1, 2, 0, 1]


def _call(name, m, x):
    return m(x, torch.tensor(IDS[: x.shape[0]])) if name == "adab2n" else m(x)


def _ref(name, m, x):
    """The plain formula with the layer's parameters and its buffers *before* the call."""
    if name == "ghostbn":  # BatchNorm on each chunk of virtual_batch_size samples (the last one smaller)
        return torch.cat([bn(ch, *batch_stats(ch), m.weight, m.bias) for ch in x.split(m.virtual_batch_size)])
    if name == "ibn":
        return ref_ibn(x, m.half, m.IN.weight, m.IN.bias, m.BN.weight, m.BN.bias)
    if name == "adab2n":
        return ref_adab2n(x, torch.tensor(IDS[: x.shape[0]]), m.task_weight, int(m.cur_tasks), m.weight, m.bias)
    if name in ("bcn", "bcn_est"):
        p = m.pbn
        if name == "bcn":
            mb, vb = batch_stats(x)
            a = bn(x, mb, vb, p.weight, p.bias)
        else:
            a = ref_estbn(x, p.running_mean.clone(), p.running_var.clone(), p.weight, p.bias, float(p.estbn_moving_speed))
        return ref_group_part(a, m.num_groups, m.weight, m.bias)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    if name == "batchrenorm":
        return ref_renorm(x, rm, rv, m.weight, m.bias, m.r_max, m.d_max)
    return ref_estbn(x, rm, rv, m.weight, m.bias, float(m.estbn_moving_speed))


NAMES = ["batchrenorm", "estbn", "ibn", "bcn", "bcn_est", "adab2n", "ghostbn"]


@pytest.mark.parametrize("name", NAMES)
def test_auto_equals_the_plain_formula_float64(name):
    m = _layer(name, 6)
    x = (torch.randn(6, 6, 4, 3, dtype=D) * 2 + 0.7).requires_grad_()
    g = torch.randn(6, 6, 4, 3, dtype=D)
    want = _ref(name, m, x)
    got = _call(name, m, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [x, *(p for p in m.parameters() if p.requires_grad)]
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
        _call(name, m, x)
    assert sum(seen.values()) <= 2 * x.numel() * x.element_size() + 4096


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("name", NAMES)
def test_overflow_and_underflow_match_float64(name, scale):
    m = _layer(name, 4, torch.float32)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    md = _layer(name, 4, D)
    want = _ref(name, md, x.double() * scale)
    y = _call(name, m, x * scale)
    assert torch.isfinite(y).all()
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", NAMES)
def test_nan_stays_nan(name):
    m = _layer(name, 4, torch.float32)
    x = torch.randn(3, 4, 5, 5)
    x[1, 3, 3, 3] = float("nan")
    y = _call(name, m, x)
    assert y[1, 3].isnan().all()  # never masked
    if name != "bcn_est":  # (EstBN's estimates are running values: its NaN reaches the next calls)
        assert not y[:, :2].isnan().any()
    if name == "ghostbn":  # the other virtual batch is untouched
        assert not y[2:].isnan().any()  # the other channels' (groups') statistics stay finite


def test_estbn_two_forwards_then_one_backward():
    # the estimates ATen's op receives are fresh tensors, not the buffers the next call overwrites
    m = _layer("estbn", 4, torch.float32)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    (m(x).sum() + m(x * 2).square().sum()).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["ibn", "bcn", "bcn_est", "adab2n", "ghostbn"])
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_float64_train_and_eval(name, train):
    m = _layer(name, 4).train(train)
    x = (torch.randn(3, 4, 3, 2, dtype=D) + 0.5).requires_grad_()
    params = tuple(p for p in m.parameters() if p.requires_grad)
    state = {k: v.clone() for k, v in m.named_buffers()}

    def f(x, *ps):
        if train:  # each evaluation from the same running statistics
            with torch.no_grad():
                for k, v in m.named_buffers():
                    v.copy_(state[k])
        return _call(name, m, x)

    if name == "bcn_est" and train:  # EstBN's estimates are stop-gradient functions of x: only the params
        assert torch.autograd.gradcheck(lambda *ps: f(x.detach(), *ps), params, eps=1e-6, atol=1e-7)
    else:
        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_sample_moments_and_affine_gradcheck_and_double_backward():
    x = (torch.randn(3, 4, 5, dtype=D) * 2 + 1).requires_grad_()
    a = torch.randn(3, 4, dtype=D, requires_grad=True)
    b = torch.randn(1, 4, dtype=D, requires_grad=True)

    def f(x, a, b):
        m, v = sample_moments(x)
        return sample_affine(x, a * torch.rsqrt(v + 0.1), b - m.mean(0, keepdim=True))

    assert torch.autograd.gradcheck(f, (x, a, b))
    assert torch.autograd.gradgradcheck(f, (x, a, b))
    m, v = sample_moments(x)
    torch.testing.assert_close(m, x.mean(2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, x.var(2, correction=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ibn", "bcn", "adab2n", "ghostbn"])
def test_eager_backend_is_the_reference_and_agrees(name):
    m = _layer(name, 6)
    x = torch.randn(4, 6, 3, 3, dtype=D)
    with set_backend("eager"):
        e = _call(name, _layer(name, 6), x)
    torch.testing.assert_close(_call(name, m, x), e, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bcn_est"])  # (IBN's and AdaB2N's compile tests live in their own files)
def test_compiles_fullgraph_and_matches_eager(name):
    """EstBN's estimates feed the backward: a compiled backward must see this step's, not the updated buffers."""
    import copy

    torch._dynamo.reset()
    m = _layer(name, 4, torch.float32)
    c = torch.compile(copy.deepcopy(m), fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 4, 3, 3, requires_grad=True)
        y, yc = _call(name, m, x), _call(name, c, x)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
        g, gc = torch.autograd.grad(y.square().sum(), x)[0], torch.autograd.grad(yc.square().sum(), x)[0]
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-4)
    for (k, a), b in zip(m.state_dict().items(), c.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
