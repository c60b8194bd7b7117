"""PowerNorm against a plain re-statement of the official code (sIncerass/powernorm, MaskPowerNorm)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.power_norm import group_scaling, power_norm, snapshot
from normkit.nn.power_norm import PowerNorm

D = torch.float64
C = 8


# --- the method, written out step by step ----------------------------------------------------------------


def ref_group_scaling(x, groups, eps=1e-5):
    """GroupScaling1D: each token's channel groups divided by their RMS."""
    xg = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    return (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + eps)).reshape(x.shape)


class RefPowerNorm:
    """One training step = forward + the approximate backward, with the state kept in plain tensors."""

    def __init__(self, c, warmup, afwd=0.9, abkw=0.9, eps=1e-5, groups=1, paper_exact=False):
        self.phi, self.ema, self.t = torch.ones(c, dtype=D), torch.zeros(c, dtype=D), 0
        self.warmup, self.afwd, self.abkw, self.eps, self.groups, self.paper_exact = warmup, afwd, abkw, eps, groups, paper_exact
        self.used_running = False

    def step(self, x, w, b, gy, pad=None):
        """Returns y, dx, dw, db and (Gamma, Lambda) of the nu recursion."""
        c = x.shape[-1]
        x = x.detach().requires_grad_()
        xs = ref_group_scaling(x, self.groups) if self.groups else x
        flat = xs.detach().reshape(-1, c)
        kept = flat if pad is None else flat[~pad.reshape(-1)]
        self.t += 1
        var = (kept**2).sum(0) / kept.shape[0]
        if self.t <= self.warmup:
            denom = var
        else:
            denom = self.phi
            self.used_running = True
        z = flat / torch.sqrt(denom + self.eps)
        y = w * z + b
        if self.t < self.warmup:
            self.phi = self.phi * (self.t - 1) / self.t + var / self.t
        self.phi = self.afwd * self.phi + (1 - self.afwd) * var
        # backward
        g = gy.reshape(-1, c) * w
        gamma, lam = (z * z).mean(0), (g * z).mean(0)
        approx = g - (1 - self.abkw) * self.ema * z
        self.ema = self.ema + (approx * z).mean(0)
        dxs = approx / torch.sqrt((denom if self.paper_exact else var) + self.eps)
        (dx,) = torch.autograd.grad(xs, x, dxs.reshape(x.shape))
        dw, db = (gy.reshape(-1, c) * z).sum(0), gy.reshape(-1, c).sum(0)
        return y.reshape(x.shape), dx, dw, db, (gamma, lam)


def _module(**kw):
    m = PowerNorm(C, dtype=D, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def _step(m, x, gy, pad=None):
    x = x.detach().requires_grad_()
    y = m(x, pad)
    dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], gy)
    return y, dx, dw, db


@pytest.mark.parametrize(
    "kw, masked",
    [
        ({"warmup_iters": 3}, False),
        ({"warmup_iters": 2, "num_groups": 2, "paper_exact": True, "alpha_fwd": 0.8, "alpha_bkw": 0.7}, True),
        ({"warmup_iters": 0, "num_groups": None}, True),
    ],
)
def test_train_steps_match_the_equations_and_the_nu_recursion(kw, masked):
    m = _module(**kw)
    ref = RefPowerNorm(
        C,
        kw["warmup_iters"],
        kw.get("alpha_fwd", 0.9),
        kw.get("alpha_bkw", 0.9),
        groups=kw.get("num_groups", 1),
        paper_exact=kw.get("paper_exact", False),
    )
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    a = kw.get("alpha_bkw", 0.9)
    nu_prev = torch.zeros(C, dtype=D)
    for step in range(6):
        x = torch.randn(3, 5, C, dtype=D) * (1 + step) + 0.3
        gy = torch.randn(3, 5, C, dtype=D)
        pad = (torch.rand(3, 5) < 0.3) if masked else None
        got = _step(m, x, gy, pad)
        y, dx, dw, db, (gamma, lam) = ref.step(x, w, b, gy, pad)
        for u, v in zip(got, (y, dx, dw, db)):
            torch.testing.assert_close(u, v)
        torch.testing.assert_close(m.running_phi, ref.phi)
        torch.testing.assert_close(m.ema_gz, ref.ema)
        assert m.iters.item() == step + 1
        # the paper's recursion for nu = (1 - alpha_bkw) * ema_gz
        nu = (1 - a) * m.ema_gz
        torch.testing.assert_close(nu, nu_prev * (1 - (1 - a) * gamma) + (1 - a) * lam)
        nu_prev = nu
    assert ref.used_running  # the post-warmup branch ran


def test_eval_is_the_running_quadratic_mean_affine_map():
    m = _module(num_groups=2)
    with torch.no_grad():
        m.running_phi.uniform_(0.5, 2.0)
    m.eval()
    x = torch.randn(2, 4, C, dtype=D)
    want = m.weight * ref_group_scaling(x, 2) / torch.sqrt(m.running_phi + 1e-5) + m.bias
    torch.testing.assert_close(m(x), want)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(x)  # eval leaves every buffer alone
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    # no GroupScaling
    m2 = _module(num_groups=None)
    m2.eval()
    torch.testing.assert_close(m2(x), m2.weight * x / torch.sqrt(torch.ones(C, dtype=D) + 1e-5) + m2.bias)


def test_running_phi_update_step_by_step():
    m = PowerNorm(C, warmup_iters=3, alpha_fwd=0.8, num_groups=None, dtype=D)
    phi = torch.ones(C, dtype=D)
    for t in range(1, 6):
        x = torch.randn(4, 3, C, dtype=D) * t
        var = (x**2).mean((0, 1))
        m(x)
        if t < 3:
            phi = phi * (t - 1) / t + var / t  # cumulative mean, then the EMA as well
        phi = 0.8 * phi + 0.2 * var
        torch.testing.assert_close(m.running_phi, phi)
    assert m.iters.item() == 5


def test_warmup_uses_batch_statistics_then_the_previous_running_value():
    m = PowerNorm(C, warmup_iters=2, num_groups=None, affine=False, dtype=D)
    with torch.no_grad():
        m.running_phi.fill_(100.0)
    for _ in range(2):
        x = torch.randn(3, 4, C, dtype=D) * 3
        torch.testing.assert_close(m(x), x / torch.sqrt((x**2).mean((0, 1)) + 1e-5))  # running_phi not used
    phi_before = m.running_phi.clone()
    x = torch.randn(3, 4, C, dtype=D)
    torch.testing.assert_close(m(x), x / torch.sqrt(phi_before + 1e-5))  # t = 3 > warmup: psi_{t-1}


def test_pad_mask_drops_padded_tokens_from_the_statistics():
    pad = torch.tensor([[False, False, True, True], [False, True, True, True], [False, False, False, False]])
    x = torch.randn(3, 4, C, dtype=D)
    full, packed = _module(warmup_iters=1), _module(warmup_iters=1)
    packed.load_state_dict(full.state_dict())
    for _ in range(3):  # warmup step, then running statistics
        x = torch.randn(3, 4, C, dtype=D)
        y = full(x, pad)
        y_packed = packed(x[~pad])  # the real tokens only, as (N, C)
        torch.testing.assert_close(y[~pad], y_packed)
        torch.testing.assert_close(full.running_phi, packed.running_phi)
    # an all-False mask is no mask, backward state included
    a, b = _module(warmup_iters=1), _module(warmup_iters=1)
    b.load_state_dict(a.state_dict())
    gy = torch.randn_like(x)
    for ga, gb in zip(_step(a, x, gy, torch.zeros(3, 4, dtype=torch.bool)), _step(b, x, gy)):
        torch.testing.assert_close(ga, gb)
    torch.testing.assert_close(a.ema_gz, b.ema_gz)


def _run(m, batches):
    out = []
    for x, gy, pad in batches:
        out.append(_step(m, x, gy, pad))
    return out


def test_state_dict_resume_is_identical_to_an_uninterrupted_run():
    torch.manual_seed(1)
    batches = [(torch.randn(2, 5, C, dtype=D), torch.randn(2, 5, C, dtype=D), torch.rand(2, 5) < 0.2) for _ in range(6)]
    kw = {"warmup_iters": 2, "num_groups": 2}
    straight = _module(**kw)
    first = PowerNorm(C, dtype=D, **kw)
    first.load_state_dict(straight.state_dict())
    want = _run(straight, batches)
    _run(first, batches[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = PowerNorm(C, dtype=D, **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.iters.item() == 3
    got = _run(resumed, batches[3:])
    for a, b in zip(got, want[3:]):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


def test_official_state_dict_shapes_load():
    m = PowerNorm(C)
    sd = {
        "weight": torch.rand(C),
        "bias": torch.rand(C),
        "running_phi": torch.rand(1, C, 1, 1),
        "ema_gz": torch.rand(1, C, 1, 1),
        "iters": torch.tensor([7]),
    }
    m.load_state_dict(sd, strict=True)
    torch.testing.assert_close(m.running_phi, sd["running_phi"].flatten())
    torch.testing.assert_close(m.ema_gz, sd["ema_gz"].flatten())
    assert m.iters.item() == 7 and set(m.state_dict()) == set(sd)


def test_compiled_multi_step_matches_eager_across_warmup():
    torch._dynamo.reset()
    kw = {"warmup_iters": 2, "num_groups": 2, "paper_exact": True}
    m, ref = PowerNorm(C, **kw), PowerNorm(C, **kw)
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, fullgraph=True)
    for _ in range(4):
        x = torch.randn(2, 5, C)
        pad = torch.rand(2, 5) < 0.3
        gy = torch.randn(2, 5, C)
        for u, v in zip(_step(cm, x, gy, pad), _step(ref, x, gy, pad)):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    m.eval()
    ref.eval()
    torch.testing.assert_close(cm(x, pad), ref(x, pad))


class _ScaleByStep(torch.autograd.Function):
    """Forward uses stats[0]; backward multiplies by the step stats[1]."""

    @staticmethod
    def forward(ctx, x, stats):
        ctx.save_for_backward(stats)
        return x * stats[0]

    @staticmethod
    def backward(ctx, g):
        (stats,) = ctx.saved_tensors
        return g * stats[1], None


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("it", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        t = (self.it + 1).to(x.dtype)
        scale = x.detach().abs().amax().reshape(1)
        self.it.add_(1)
        # passing t as its own backward-only argument gives steps 2, 3, 4 under compile (torch 2.13)
        return _ScaleByStep.apply(x, snapshot(scale, t))


def test_snapshot_gives_the_backward_this_steps_counter_under_compile():
    torch._dynamo.reset()
    m = torch.compile(_Counter(), fullgraph=True)
    for step in (1, 2, 3):
        x = torch.ones(3, requires_grad=True)
        m(x).sum().backward()
        assert x.grad[0].item() == step


def test_two_forwards_before_one_backward():
    m = PowerNorm(C, warmup_iters=1)
    x1, x2 = torch.randn(4, C, requires_grad=True), torch.randn(4, C, requires_grad=True)
    (m(x1).square().sum() + m(x2).square().sum()).backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(x2.grad).all() and m.ema_gz.abs().sum() > 0
    assert m.iters.item() == 2


def test_eval_gradcheck_and_affine_false_backward():
    m = _module(num_groups=2)
    m.eval()
    x = torch.randn(2, 3, C, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    plain, unit = PowerNorm(C, warmup_iters=1, affine=False, dtype=D), PowerNorm(C, warmup_iters=1, dtype=D)
    for _ in range(3):
        x = torch.randn(2, 3, C, dtype=D, requires_grad=True)
        gy = torch.randn(2, 3, C, dtype=D)
        (a,) = torch.autograd.grad(plain(x), x, gy)
        (b,) = torch.autograd.grad(unit(x), x, gy)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain.ema_gz, unit.ema_gz)


def test_half_input_accumulates_in_float32():
    m = PowerNorm(C, warmup_iters=1)
    x = torch.randn(3, 4, C).to(torch.bfloat16).requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    ref = PowerNorm(C, warmup_iters=1)
    torch.testing.assert_close(y.float(), ref(x.detach().float()), rtol=2e-2, atol=2e-2)


def test_functional_group_scaling_and_repr():
    x = torch.randn(3, C, dtype=D)
    torch.testing.assert_close(group_scaling(x, 4), ref_group_scaling(x, 4))
    r = repr(PowerNorm(C, paper_exact=True))
    assert "warmup_iters=10000" in r and "num_groups=1" in r and "paper_exact=True" in r


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.1, 10.0))
def test_warmup_output_is_invariant_to_per_channel_scale(seed, s):
    """No centring: with batch statistics (warmup) and eps = 0, y(x·s_c) = y(x) for s_c > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, C, generator=g, dtype=D)
    scale = torch.rand(C, generator=g, dtype=D) * s + 0.05
    m1, m2 = PowerNorm(C, eps=0.0, num_groups=None, dtype=D), PowerNorm(C, eps=0.0, num_groups=None, dtype=D)
    torch.testing.assert_close(m1(x * scale), m2(x))


def test_errors():
    m = PowerNorm(C)
    with pytest.raises(ValueError, match=r"expects input \(B, T, 8\) or \(N, 8\), got \(2, 3, 5\)"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        m(torch.randn(2, 3, 4, C))
    with pytest.raises(ValueError, match=r"pad_mask must have shape \(2, 3\)"):
        m(torch.randn(2, 3, C), torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="pad_mask must be a bool tensor"):
        m(torch.randn(2, 3, C), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, C, dtype=torch.long))
    with pytest.raises(ValueError, match="num_groups"):
        PowerNorm(C, num_groups=3)
    with pytest.raises(ValueError, match="alpha_fwd"):
        PowerNorm(C, alpha_fwd=1.5)
    with pytest.raises(ValueError, match="warmup_iters"):
        PowerNorm(C, warmup_iters=-1)
    with pytest.raises(ValueError, match="eps"):
        PowerNorm(C, eps=-1.0)
    with pytest.raises(ValueError, match="needs the state buffer ema_gz"):
        power_norm(torch.randn(2, C), torch.ones(C), training=True, iters=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="iters must be an integer tensor"):
        power_norm(torch.randn(2, C), torch.ones(C), training=True, ema_gz=torch.zeros(C), iters=torch.zeros(1))


def test_group_num_is_the_old_name_of_num_groups():
    import warnings

    with pytest.warns(FutureWarning, match=r"PowerNorm: group_num= is renamed to num_groups=.*num_groups=2"):
        old = PowerNorm(C, warmup_iters=2, group_num=2, dtype=D)
    new = PowerNorm(C, warmup_iters=2, num_groups=2, dtype=D)
    assert old.num_groups == new.num_groups == 2 and repr(old) == repr(new)
    with pytest.warns(FutureWarning, match="renamed to num_groups"):
        assert old.group_num == 2
    x = torch.randn(3, 4, C, dtype=D)
    torch.testing.assert_close(old(x), new(x))
    with pytest.warns(FutureWarning):
        assert PowerNorm(C, group_num=None).num_groups is None  # None (GroupScaling off) is passed through
    with pytest.raises(TypeError, match="both num_groups=2 and its old name group_num=2"):
        PowerNorm(C, num_groups=2, group_num=2)
    with pytest.warns(FutureWarning, match=r"group_scaling\(\): group_num="):
        torch.testing.assert_close(group_scaling(x, group_num=4), group_scaling(x, 4))
    with pytest.raises(TypeError, match="missing required argument 'num_groups'"):
        group_scaling(x)
    with pytest.warns(FutureWarning, match=r"power_norm\(\): group_num="):
        got = power_norm(x, torch.ones(C, dtype=D), group_num=None)
    torch.testing.assert_close(got, power_norm(x, torch.ones(C, dtype=D), num_groups=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name, the defaults and the module's forward: silent
        PowerNorm(C, num_groups=4)(x)
        power_norm(x, torch.ones(C, dtype=D))
