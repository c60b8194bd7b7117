"""Ghost BatchNorm and Batch Renormalization against plain statements of their algorithms."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.batch_variants import batch_renorm, batch_renorm_limits, ghost_batch_norm
from normkit.nn.batch_variants import BatchRenorm, GhostBatchNorm

D = torch.float64
DIMS = (0, 2, 3)


def _c(p):
    return p.reshape(1, -1, 1, 1)


def moments(x):
    m = x.mean(DIMS, keepdim=True)
    return m, ((x - m) ** 2).mean(DIMS, keepdim=True)


def bn_train(x, w, b, eps=1e-5):
    m, v = moments(x)
    return (x - m) / torch.sqrt(v + eps) * _c(w) + _c(b)


def bn_eval(x, rm, rv, w, b, eps=1e-5):
    return (x - _c(rm)) / torch.sqrt(_c(rv) + eps) * _c(w) + _c(b)


def _rand(m):
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- Ghost BN


def test_ghost_bn_train_uneven_batch_and_running_stats_per_chunk():
    m = _rand(GhostBatchNorm(3, virtual_batch_size=4, dtype=D))
    x = torch.randn(10, 3, 2, 2, dtype=D) * 2 + 1
    y = m(x)
    chunks = [x[0:4], x[4:8], x[8:10]]  # last chunk smaller
    torch.testing.assert_close(y, torch.cat([bn_train(c, m.weight, m.bias) for c in chunks]))
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    for c in chunks:  # one torch-style momentum step per virtual batch, in order
        mean, var = moments(c)
        n = c.shape[0] * 4
        rm = 0.9 * rm + 0.1 * mean.reshape(3)
        rv = 0.9 * rv + 0.1 * var.reshape(3) * n / (n - 1)
    torch.testing.assert_close(m.running_mean, rm)
    torch.testing.assert_close(m.running_var, rv)
    assert m.num_batches_tracked.item() == 3
    m.eval()
    xe = torch.randn(5, 3, 2, 2, dtype=D)
    torch.testing.assert_close(m(xe), bn_eval(xe, rm, rv, m.weight, m.bias))


def test_ghost_bn_equals_torch_bn_on_each_chunk():
    ours, ref = GhostBatchNorm(4, 4), torch.nn.BatchNorm2d(4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(9, 4, 3, 3)
    y = ours(x)
    # chunks of 4, 4, 1 (split), not 3, 3, 3 (x.chunk(ceil(9 / 4)), TabNet's rule)
    torch.testing.assert_close(y, torch.cat([ref(c) for c in (x[:4], x[4:8], x[8:])]))
    assert ours.num_batches_tracked.item() == 3
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


def test_ghost_bn_cumulative_momentum_none():
    m = GhostBatchNorm(2, 2, momentum=None, dtype=D)
    x = torch.randn(6, 2, 3, dtype=D)
    m(x)
    means = torch.stack([c.mean((0, 2)) for c in x.split(2)])
    torch.testing.assert_close(m.running_mean, means.mean(0))  # cumulative average over the 3 chunks


def test_ghost_bn_gradcheck_and_state_dict():
    x = torch.randn(5, 2, 2, 2, dtype=D, requires_grad=True)
    w, b = torch.rand(2, dtype=D, requires_grad=True), torch.randn(2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ghost_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, 2), (x, w, b))
    m = _rand(GhostBatchNorm(2, 2))
    m(torch.randn(6, 2, 2, 2))
    m2 = GhostBatchNorm(2, 2)
    m2.load_state_dict(_roundtrip(m.state_dict()))
    assert m2.num_batches_tracked.item() == 3
    bn = torch.nn.BatchNorm2d(2)
    bn.load_state_dict(m.state_dict())  # torch's keys
    x = torch.randn(4, 2, 2, 2)
    m.eval(), bn.eval()
    torch.testing.assert_close(m(x), bn(x))


def test_ghost_bn_errors():
    for bad in (0, -2, 2.5, True, None):
        with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
            GhostBatchNorm(4, bad)
    with pytest.raises(ValueError, match=r"last virtual batch has 1 sample.*N=5, virtual_batch_size=2"):
        GhostBatchNorm(4, 2)(torch.randn(5, 4))
    assert GhostBatchNorm(4, 2)(torch.randn(5, 4, 3)).shape == (5, 4, 3)  # 1 sample x 3 positions is fine
    with pytest.raises(ValueError, match="expects 4 channels.*got 3"):
        GhostBatchNorm(4, 2)(torch.randn(4, 3, 2))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 7), st.integers(0, 2**16))
def test_ghost_bn_with_one_virtual_batch_is_bn(n, seed):
    x = torch.randn(n, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=D)
    w, b = torch.ones(3, dtype=D), torch.zeros(3, dtype=D)
    for vbs in (n, n + 3):
        y = ghost_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, vbs)
        torch.testing.assert_close(y, bn_train(x[..., None], w, b)[..., 0])


# ---------------------------------------------------------------- Batch Renorm


def ref_brn(x, rm, rv, w, b, r_max, d_max, eps=1e-5):
    """Algorithm 1 of the paper, with σ = sqrt(running_var + eps); r, d held constant."""
    mu_b, var_b = moments(x)
    sig_b = torch.sqrt(var_b + eps)
    sig = torch.sqrt(_c(rv) + eps)
    with torch.no_grad():
        r = torch.clamp(sig_b / sig, 1 / r_max, r_max)
        d = torch.clamp((mu_b - _c(rm)) / sig, -d_max, d_max)
    return ((x - mu_b) / sig_b * r + d) * _c(w) + _c(b)


def test_brn_train_eval_and_running_stats_step_by_step():
    m = _rand(BatchRenorm(4, r_max=1.5, d_max=0.5, schedule=False, momentum=0.2, dtype=D))
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.0, 2.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([1.0, 0.1, 9.0, 1.2]))
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    clipped = False
    for step in range(4):
        x = torch.randn(6, 4, 3, 3, dtype=D) * 1.5 + 0.3 * step
        want = ref_brn(x, rm, rv, m.weight, m.bias, 1.5, 0.5)
        torch.testing.assert_close(m(x), want)
        mu_b, var_b = moments(x)
        sig_b = torch.sqrt(var_b.reshape(4) + 1e-5)
        clipped |= bool(((sig_b / torch.sqrt(rv + 1e-5) - 1.5).abs() > 0).any())
        sig = torch.sqrt(rv + 1e-5)
        sig = sig + 0.2 * (sig_b - sig)  # σ ← σ + α(σ_B − σ)
        rm = rm + 0.2 * (mu_b.reshape(4) - rm)  # μ ← μ + α(μ_B − μ)
        rv = sig**2 - 1e-5
        torch.testing.assert_close(m.running_mean, rm)
        torch.testing.assert_close(m.running_var, rv)
    assert m.num_batches_tracked.item() == 4
    m.eval()
    xe = torch.randn(3, 4, 2, 2, dtype=D)
    torch.testing.assert_close(m(xe), bn_eval(xe, rm, rv, m.weight, m.bias))
    assert m.num_batches_tracked.item() == 4


def test_brn_clipping_is_active_in_the_test():
    # sanity of the test above: with these running stats r and d do hit their bounds
    x = torch.randn(6, 4, 3, 3, dtype=D) * 1.5
    rm, rv = torch.tensor([0.0, 2.0, -2.0, 0.5], dtype=D), torch.tensor([1.0, 0.1, 9.0, 1.2], dtype=D)
    w, b = torch.ones(4, dtype=D), torch.zeros(4, dtype=D)
    loose = batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.0, 1e-5, 100.0, 100.0)
    tight = batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.0, 1e-5, 1.5, 0.5)
    assert not torch.allclose(loose, tight)
    torch.testing.assert_close(loose, bn_eval(x, rm, rv, w, b))  # unclipped r, d give the running-stat output


def test_brn_running_update_var_is_torch_bn():
    m, bn = BatchRenorm(3, momentum=0.1, running_update="var"), torch.nn.BatchNorm2d(3, momentum=0.1)
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(m(x), bn(x))  # step 1: r_max = 1, d_max = 0 → BatchNorm
    torch.testing.assert_close(m.running_var, bn.running_var)
    torch.testing.assert_close(m.running_mean, bn.running_mean)


def test_brn_gradient_is_the_formula_with_r_d_constant():
    x = torch.randn(5, 3, 2, 2, dtype=D, requires_grad=True)
    w, b = torch.rand(3, dtype=D, requires_grad=True), torch.randn(3, dtype=D, requires_grad=True)
    rm, rv = torch.randn(3, dtype=D), torch.rand(3, dtype=D) + 0.2

    def f(x, w, b):  # fresh copies: the in-place running update must not change r, d between gradcheck calls
        return batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 1.3, 0.4)

    # the formula with r, d fixed at their values for this x is what backprop differentiates
    with torch.no_grad():
        mu_b, var_b = moments(x)
        sig = torch.sqrt(_c(rv) + 1e-5)
        r = torch.clamp(torch.sqrt(var_b + 1e-5) / sig, 1 / 1.3, 1.3)
        d = torch.clamp((mu_b - _c(rm)) / sig, -0.4, 0.4)

    def fixed(x, w, b):
        mu_b, var_b = moments(x)
        return ((x - mu_b) / torch.sqrt(var_b + 1e-5) * r + d) * _c(w) + _c(b)

    assert torch.autograd.gradcheck(fixed, (x, w, b))
    y = f(x, w, b)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(fixed(x, w, b), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    # where every r and d sits at its clip bound they are locally constant: plain gradcheck holds
    far_m, far_v = torch.full((3,), 50.0, dtype=D), torch.full((3,), 1e4, dtype=D)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_renorm(x, far_m.clone(), far_v.clone(), w, b, True, 0.1, 1e-5, 1.3, 0.4), (x, w, b)
    )
    # r and d are constants: this is not the gradient of the un-stopped expression
    x2 = x.detach().clone().requires_grad_()
    mu_b, var_b = moments(x2)
    sig = torch.sqrt(_c(rv) + 1e-5)
    free = (
        (x2 - mu_b) / torch.sqrt(var_b + 1e-5) * torch.clamp(torch.sqrt(var_b + 1e-5) / sig, 1 / 1.3, 1.3)
        + torch.clamp((mu_b - _c(rm)) / sig, -0.4, 0.4)
    ) * _c(w) + _c(b)
    assert not torch.allclose(torch.autograd.grad(free, x2, g)[0], got[0])


def test_brn_schedule():
    steps = torch.tensor([1, 5000, 5001, 22500, 25000, 40000, 90000])
    r, d = batch_renorm_limits(steps)
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0, 1 + 2 / 35000, 1 + 2 * 17500 / 35000, 1 + 2 * 20000 / 35000, 3.0, 3.0]))
    torch.testing.assert_close(d, torch.tensor([0.0, 0.0, 5 / 20000, 5 * 17500 / 20000, 5.0, 5.0, 5.0]))
    m = BatchRenorm(2, warmup_steps=1, r_max_end_step=3, d_max_end_step=2)
    seen = []
    for _ in range(4):
        m(torch.randn(4, 2, 2))
        seen.append(tuple(round(float(t), 4) for t in m.current_limits()))
    assert seen == [(1.0, 0.0), (2.0, 5.0), (3.0, 5.0), (3.0, 5.0)]
    m.eval()
    m(torch.randn(4, 2, 2))
    assert m.num_batches_tracked.item() == 4
    fixed = BatchRenorm(2, r_max=2.0, d_max=1.0, schedule=False)
    assert [float(t) for t in fixed.current_limits()] == [2.0, 1.0]


def test_brn_state_dict_resume_with_counter():
    kw = {"warmup_steps": 1, "r_max_end_step": 4, "d_max_end_step": 3}
    a = _rand(BatchRenorm(3, **kw))
    xs = [torch.randn(4, 3, 2, 2) * (i + 1) + i for i in range(5)]
    for x in xs[:2]:
        a(x)
    b = BatchRenorm(3, **kw)
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert b.num_batches_tracked.item() == 2
    for x in xs[2:]:
        torch.testing.assert_close(b(x), a(x))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    bn = torch.nn.BatchNorm2d(3)
    bn.load_state_dict(a.state_dict())  # torch's keys, both ways
    BatchRenorm(3).load_state_dict(bn.state_dict())


@pytest.mark.slow
def test_brn_compiled_follows_the_schedule_without_graph_breaks():
    torch._dynamo.reset()
    kw = {"warmup_steps": 1, "r_max_end_step": 3, "d_max_end_step": 2}
    eager, comp = BatchRenorm(3, **kw), BatchRenorm(3, **kw)
    with torch.no_grad():
        for m in (eager, comp):
            m.running_mean.fill_(0.7)
            m.running_var.fill_(4.0)
    cm = torch.compile(comp, fullgraph=True)
    for i in range(3):
        x = torch.randn(4, 3, 2, 2) * (1 + i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # the counter never forces a recompile
            torch.testing.assert_close(cm(x), eager(x))
    torch.testing.assert_close(comp.running_var, eager.running_var)
    assert comp.num_batches_tracked.item() == 3


def test_brn_errors():
    with pytest.raises(ValueError, match="r_max must be a number >= 1"):
        BatchRenorm(4, r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be a number >= 0"):
        BatchRenorm(4, d_max=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        BatchRenorm(4, momentum=None)
    with pytest.raises(ValueError, match="ramps must end after the warm-up"):
        BatchRenorm(4, warmup_steps=100, r_max_end_step=50)
    with pytest.raises(ValueError, match="running_update"):
        BatchRenorm(4, running_update="ema")
    with pytest.raises(ValueError, match="expects 4 channels.*got 3"):
        BatchRenorm(4)(torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        batch_renorm(torch.randn(2, 4, 2), None, None, training=True)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(-3, 3), st.floats(0.1, 10))
def test_brn_with_unit_bounds_is_batch_norm(seed, mean, var):
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=D)
    w, b = torch.ones(3, dtype=D), torch.zeros(3, dtype=D)
    rm, rv = torch.full((3,), mean, dtype=D), torch.full((3,), var, dtype=D)
    torch.testing.assert_close(batch_renorm(x, rm, rv, w, b, True, 0.1, 1e-5, 1.0, 0.0), bn_train(x, w, b))


def test_mask_keeps_padding_out_of_the_statistics():
    x = torch.randn(6, 3, 5, dtype=D)
    mask = torch.ones(6, 1, 5, dtype=torch.bool)
    mask[..., 3:] = False  # the last two positions are padding
    g = GhostBatchNorm(3, 2, dtype=D)
    want = torch.cat([GhostBatchNorm(3, 2, dtype=D)(c[..., :3]) for c in x.split(2)])
    torch.testing.assert_close(g(x, mask)[..., :3], want)
    a, b = BatchRenorm(3, dtype=D), BatchRenorm(3, dtype=D)
    torch.testing.assert_close(a(x, mask)[..., :3], b(x[..., :3]))
    torch.testing.assert_close(a.running_var, b.running_var)
