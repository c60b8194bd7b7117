"""Unified Normalization against a plain re-statement of the official code (hikvision-research, UN1d)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.unified_norm import unified_norm
from normkit.nn.unified_norm import UnifiedNorm

D = torch.float64
C = 8


# --- the method, written out step by step ----------------------------------------------------------------


def unbiased_var(v):
    v = v.flatten()
    return ((v - v.mean()) ** 2).sum() / (v.numel() - 1)


def geo_mean(rows):
    return torch.prod(rows, 0) ** (1.0 / rows.shape[0])


class RefUN:
    """One training step = forward + the smoothed backward, state in plain tensors, branches as Python ifs."""

    def __init__(self, c, wf, wb, warmup, filt, m=0.9, eps=1e-5, comp=1000):
        self.rv, self.ema = torch.ones(c, dtype=D), torch.zeros(c, dtype=D)
        self.bx, self.bg = torch.zeros(wf, c, dtype=D), torch.zeros(wb, c, dtype=D)
        self.t, self.skips = 0, 0
        self.wf, self.wb, self.warmup, self.filt, self.m, self.eps, self.comp = wf, wb, warmup, filt, m, eps, comp
        self.seen = set()  # which branches ran

    def step(self, x, w, b, gy, pad=None):
        c, eps, m = x.shape[-1], self.eps, self.m
        flat = x.reshape(-1, c)
        kept = flat if pad is None else flat[~pad.reshape(-1)]
        self.t += 1
        t = self.t
        x2 = (kept**2).mean(0)
        recorded = unbiased_var(torch.sqrt(self.bx))
        self.bx[t % self.wf] = x2
        skip = self.wf <= 1
        if self.filt and t >= self.warmup:
            am = self.bx.mean(0)
            if bool(((am - geo_mean(self.bx)) > recorded * self.wf).any()):
                self.bx[t % self.wf] = self.rv
                skip = True
                self.skips += 1
                self.seen.add("outlier")
        if t <= self.wf or t < self.warmup or skip:
            var = x2
        else:
            var = geo_mean(self.bx)
            self.seen.add("window_fwd")
        if t <= max(self.comp, self.warmup) or skip:
            r = torch.ones(c, dtype=D)
        else:
            r = torch.clamp(torch.sqrt(var + eps) / torch.sqrt(self.rv + eps), 1 / 5, 5)
            self.seen.add("compensation")
        z = flat / torch.sqrt(var + eps)
        y = w * z + b
        self.rv = m * self.rv + (1 - m) * var
        # backward
        g2 = gy.reshape(-1, c)
        g = g2 * w * r
        gz = (g * z).mean(0)
        self.bg[t % self.wb] = self.ema.clone() if skip else gz
        if t <= self.wb or t < self.warmup or skip:
            mean_gz = gz
        else:
            mean_gz = self.bg.mean(0)
            self.seen.add("window_bwd")
        self.ema = m * self.ema + (1 - m) * mean_gz
        coef = mean_gz if skip else self.ema
        dx = (g - coef * z) / torch.sqrt(var + eps)
        return y.reshape(x.shape), dx.reshape(x.shape), (g2 * r * z).sum(0), g2.sum(0)


def _module(**kw):
    m = UnifiedNorm(C, dtype=D, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def _step(m, x, gy, pad=None):
    x = x.detach().requires_grad_()
    y = m(x, pad)
    dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], gy)
    return y, dx, dw, db


CASES = [
    # window smoothing in both passes and gradient compensation, no filtration
    ({"window_size": 3, "warmup_iters": 2, "compensation_iters": 4}, False, {"window_fwd", "window_bwd", "compensation"}),
    # separate windows, filtration with an outlier batch, padding mask
    (
        {"window_size": (3, 2), "warmup_iters": 4, "outlier_filtration": True, "decay": 0.8, "compensation_iters": 0},
        True,
        {"outlier", "window_fwd", "window_bwd", "compensation"},
    ),
    # a window of 1 always skips: batch statistics, r = 1, no EMA in the gradient
    ({"window_size": 1, "warmup_iters": 0}, True, set()),
]


@pytest.mark.parametrize("kw, masked, branches", CASES)
def test_train_steps_match_the_equations(kw, masked, branches):
    m = _module(**kw)
    win = kw["window_size"]
    wf, wb = (win, win) if isinstance(win, int) else win
    ref = RefUN(
        C,
        wf,
        wb,
        kw["warmup_iters"],
        kw.get("outlier_filtration", False),
        kw.get("decay", 0.9),
        comp=kw.get("compensation_iters", 1000),
    )
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    torch.manual_seed(3)
    for step in range(10):
        spike = 30.0 if step == 7 else 1.0  # an outlier batch after warmup
        x = (torch.randn(3, 5, C, dtype=D) + 0.2) * spike
        gy = torch.randn(3, 5, C, dtype=D)
        pad = (torch.rand(3, 5) < 0.3) if masked else None
        got = _step(m, x, gy, pad)
        for u, v in zip(got, ref.step(x, w, b, gy, pad)):
            torch.testing.assert_close(u, v)
        torch.testing.assert_close(m.running_var, ref.rv)
        torch.testing.assert_close(m.buffer_x2, ref.bx)
        torch.testing.assert_close(m.buffer_gz, ref.bg)
        torch.testing.assert_close(m.ema_gz, ref.ema)
        assert m.iters.item() == step + 1 and m.skip_counter.item() == ref.skips
    assert branches <= ref.seen, ref.seen


def test_outlier_slot_takes_the_running_statistic():
    m = UnifiedNorm(C, window_size=3, warmup_iters=0, outlier_filtration=True, dtype=D)
    for _ in range(4):
        m(torch.randn(4, 5, C, dtype=D))
    skips, rv = m.skip_counter.item(), m.running_var.clone()
    x = torch.randn(4, 5, C, dtype=D) * 100
    y = m(x)
    assert m.skip_counter.item() == skips + 1
    torch.testing.assert_close(m.buffer_x2[5 % 3], rv)  # t = 5
    torch.testing.assert_close(y, m.weight * x / torch.sqrt((x**2).mean((0, 1)) + 1e-5) + m.bias)  # own stats


def test_forward_uses_the_geometric_mean_of_the_window_after_warmup():
    m = UnifiedNorm(C, window_size=2, warmup_iters=0, affine=False, dtype=D)
    xs = [torch.randn(3, 4, C, dtype=D) * (i + 1) for i in range(3)]
    for x in xs[:2]:
        torch.testing.assert_close(m(x), x / torch.sqrt((x**2).mean((0, 1)) + 1e-5))  # t <= window
    x2 = [(x**2).mean((0, 1)) for x in xs[1:]]
    torch.testing.assert_close(m(xs[2]), xs[2] / torch.sqrt(torch.sqrt(x2[0] * x2[1]) + 1e-5))


def test_eval_is_a_foldable_per_channel_affine_map():
    m = _module()
    with torch.no_grad():
        m.running_var.uniform_(0.5, 2.0)
    m.eval()
    x = torch.randn(2, 6, C, dtype=D)
    want = m.weight * x / torch.sqrt(m.running_var + 1e-5) + m.bias
    torch.testing.assert_close(m(x), want)
    scale, shift = m.scale_shift()
    torch.testing.assert_close(x * scale + shift, want)
    lin = torch.nn.Linear(C, 3, dtype=D)
    folded = torch.nn.Linear(C, 3, dtype=D)
    with torch.no_grad():
        folded.weight.copy_(lin.weight * scale)
        folded.bias.copy_(lin.bias + lin.weight @ shift)
    torch.testing.assert_close(folded(x), lin(m(x)))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_pad_mask_drops_padded_tokens_from_the_statistics():
    pad = torch.tensor([[False, True, True, True], [False, False, True, False], [False, False, False, False]])
    kw = {"window_size": 2, "warmup_iters": 1, "outlier_filtration": True}
    full, packed = _module(**kw), _module(**kw)
    packed.load_state_dict(full.state_dict())
    for _ in range(4):
        x = torch.randn(3, 4, C, dtype=D)
        torch.testing.assert_close(full(x, pad)[~pad], packed(x[~pad]))
        for k in ("running_var", "buffer_x2", "skip_counter", "iters"):
            torch.testing.assert_close(full.state_dict()[k], packed.state_dict()[k])
    a, b = _module(**kw), _module(**kw)
    b.load_state_dict(a.state_dict())
    gy = torch.randn_like(x)
    for ga, gb in zip(_step(a, x, gy, torch.zeros(3, 4, dtype=torch.bool)), _step(b, x, gy)):
        torch.testing.assert_close(ga, gb)


def _run(m, batches):
    return [_step(m, x, gy, pad) for x, gy, pad in batches]


def test_state_dict_resume_is_identical_to_an_uninterrupted_run():
    torch.manual_seed(1)
    batches = [
        (torch.randn(2, 5, C, dtype=D) * (1 + 9 * (i == 5)), torch.randn(2, 5, C, dtype=D), torch.rand(2, 5) < 0.2)
        for i in range(8)
    ]
    kw = {"window_size": (3, 2), "warmup_iters": 2, "outlier_filtration": True, "compensation_iters": 3}
    straight = _module(**kw)
    first = UnifiedNorm(C, dtype=D, **kw)
    first.load_state_dict(straight.state_dict())
    want = _run(straight, batches)
    _run(first, batches[:4])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = UnifiedNorm(C, dtype=D, **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = _run(resumed, batches[4:])
    for a, b in zip(got, want[4:]):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert straight.iters.item() == 8


def test_official_state_dict_keys_and_shapes():
    m = UnifiedNorm(C, window_size=(4, 3))
    official = {
        "weight": (C,),
        "bias": (C,),
        "running_var": (C,),
        "ema_gz": (C,),
        "iters": (1,),
        "buffer_x2": (4, C),
        "buffer_gz": (3, C),
        "skip_counter": (1,),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official
    assert m.iters.dtype == m.skip_counter.dtype == torch.long


def test_compiled_multi_step_matches_eager():
    torch._dynamo.reset()
    kw = {"window_size": (2, 3), "warmup_iters": 2, "outlier_filtration": True, "compensation_iters": 3}
    m, ref = UnifiedNorm(C, **kw), UnifiedNorm(C, **kw)
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, fullgraph=True)
    for i in range(6):
        x = torch.randn(2, 5, C) * (1 + 9 * (i == 4))
        pad = torch.rand(2, 5) < 0.3
        gy = torch.randn(2, 5, C)
        for u, v in zip(_step(cm, x, gy, pad), _step(ref, x, gy, pad)):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    m.eval()
    ref.eval()
    torch.testing.assert_close(cm(x, pad), ref(x, pad))


def test_two_forwards_before_one_backward_and_half_input():
    m = UnifiedNorm(C, window_size=2, warmup_iters=0)
    x1, x2 = torch.randn(4, C, requires_grad=True), torch.randn(4, C, requires_grad=True)
    (m(x1).square().sum() + m(x2).square().sum()).backward()
    assert torch.isfinite(x1.grad).all() and m.iters.item() == 2
    xb = torch.randn(3, 4, C).to(torch.bfloat16).requires_grad_()
    y = UnifiedNorm(C)(xb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), UnifiedNorm(C)(xb.detach().float()), rtol=2e-2, atol=2e-2)


def test_eval_gradcheck_and_affine_false_backward():
    m = _module()
    m.eval()
    x = torch.randn(2, 3, C, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    kw = {"window_size": 2, "warmup_iters": 1, "compensation_iters": 2}
    plain, unit = UnifiedNorm(C, affine=False, dtype=D, **kw), UnifiedNorm(C, dtype=D, **kw)
    for _ in range(5):
        x = torch.randn(2, 3, C, dtype=D, requires_grad=True)
        gy = torch.randn(2, 3, C, dtype=D)
        (a,) = torch.autograd.grad(plain(x), x, gy)
        (b,) = torch.autograd.grad(unit(x), x, gy)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain.ema_gz, unit.ema_gz)
    torch.testing.assert_close(plain.buffer_gz, unit.buffer_gz)


def test_reset_and_repr():
    m = UnifiedNorm(C, window_size=(4, 2), warmup_iters=1)
    for _ in range(3):
        m(torch.randn(4, C))
    m.reset_running_stats()
    assert m.iters.item() == 0 and m.buffer_x2.abs().sum() == 0 and torch.all(m.running_var == 1)
    assert "window_size=(4, 2)" in repr(m) and "warmup_iters=1" in repr(m)
    assert "window_size=4, warmup_iters=4000, outlier_filtration=False" in repr(UnifiedNorm(C))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.1, 10.0))
def test_warmup_output_is_invariant_to_per_channel_scale(seed, s):
    """Batch quadratic mean during warmup, eps = 0: y(x·s_c) = y(x) for s_c > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, C, generator=g, dtype=D)
    scale = torch.rand(C, generator=g, dtype=D) * s + 0.05
    torch.testing.assert_close(UnifiedNorm(C, eps=0.0, dtype=D)(x * scale), UnifiedNorm(C, eps=0.0, dtype=D)(x))


def test_errors():
    m = UnifiedNorm(C)
    with pytest.raises(ValueError, match=r"expects input \(B, T, 8\) or \(N, 8\), got \(2, 3, 5\)"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"pad_mask must have shape \(2, 3\)"):
        m(torch.randn(2, 3, C), torch.zeros(2, 3, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="pad_mask must be a bool tensor"):
        m(torch.randn(2, 3, C), torch.zeros(2, 3, dtype=torch.long))
    for bad in (0, (1, 2, 3), "4", (2, 0), True):
        with pytest.raises(ValueError, match="window"):
            UnifiedNorm(C, window_size=bad)
    with pytest.raises(ValueError, match="momentum"):
        UnifiedNorm(C, momentum=2.0)
    with pytest.raises(ValueError, match="warmup_iters"):
        UnifiedNorm(C, warmup_iters=1.5)
    with pytest.raises(ValueError, match=r"buffer_x2, a floating tensor of shape \(window, 8\)"):
        unified_norm(torch.randn(2, C), torch.ones(C), training=True, buffer_x2=torch.zeros(4, 3))


# --- momentum in torch's convention, the official meaning as decay ------------------------------------------


def _running_var_after_one_step(**kw):
    m = UnifiedNorm(C, window_size=2, warmup_iters=10, dtype=D, **kw)
    x = torch.randn(3, 4, C, dtype=D, generator=torch.Generator().manual_seed(0))
    m(x)
    return m.running_var, (x**2).mean((0, 1))


def test_momentum_weights_the_new_value_as_in_torch():
    rv, x2 = _running_var_after_one_step(momentum=0.25)
    torch.testing.assert_close(rv, 0.75 * torch.ones(C, dtype=D) + 0.25 * x2)
    default, _ = _running_var_after_one_step()  # unchanged by the rename: 0.9 of the old value
    torch.testing.assert_close(default, 0.9 + 0.1 * x2)
    assert UnifiedNorm(C).momentum == pytest.approx(0.1) and "momentum=0.1" in repr(UnifiedNorm(C))


def test_decay_is_the_official_meaning_and_equals_one_minus_momentum():
    a, _ = _running_var_after_one_step(decay=0.8)
    b, _ = _running_var_after_one_step(momentum=0.2)
    torch.testing.assert_close(a, b)
    assert UnifiedNorm(C, decay=0.8).momentum == pytest.approx(0.2)
    with pytest.raises(TypeError, match="both momentum=0.2 and decay=0.8"):
        UnifiedNorm(C, momentum=0.2, decay=0.8)
    with pytest.raises(ValueError, match="decay"):
        UnifiedNorm(C, decay=1.5)
    x = torch.randn(4, C, dtype=D)
    want = unified_norm(x, torch.ones(C, dtype=D), momentum=0.2)  # eval: the factor is validated only
    torch.testing.assert_close(unified_norm(x, torch.ones(C, dtype=D), decay=0.8), want)


def test_old_meaning_momentum_warns_and_takes_the_new_meaning():
    with pytest.warns(FutureWarning, match=r"momentum=0.9 now weights the new value.*decay=0.9"):
        m = UnifiedNorm(C, momentum=0.9)
    assert m.momentum == 0.9
    with pytest.warns(FutureWarning, match="decay=0.9"):
        unified_norm(torch.randn(4, C), torch.ones(C), None, None, False, 0.9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch-style values, decay and the module's own forward: silent
        for kw in ({}, {"momentum": 0.1}, {"momentum": 0.5}, {"decay": 0.9}, {"decay": 0.1}):
            UnifiedNorm(C, **kw)(torch.randn(2, 3, C))
        with pytest.warns(FutureWarning):
            fast = UnifiedNorm(C, momentum=0.9)
        fast(torch.randn(2, 3, C))


def test_checkpoints_load_across_the_rename():
    old_style = UnifiedNorm(C, decay=0.9, window_size=(3, 2))
    old_style(torch.randn(2, 3, C))
    new = UnifiedNorm(C, window_size=(3, 2))
    new.load_state_dict(old_style.state_dict(), strict=True)
    for k, v in old_style.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
