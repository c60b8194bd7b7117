"""The statistics engine against moments written out by hand."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.stats import accumulation_dtype, fused_moments, mean_square, moments


def _by_hand(x, dims, correction):
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = x.sum(dims, keepdim=True) / n
    var = ((x - mean) ** 2).sum(dims, keepdim=True) / (n - correction)
    return mean, var


@pytest.mark.parametrize("dims", [(0,), (1, 2), (0, 2, 3), (3,)])
@pytest.mark.parametrize("correction", [0, 1])
def test_moments_match_hand_formula(dims, correction):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    mean, var = moments(x, dims, correction=correction)
    m, v = _by_hand(x, dims, correction)
    torch.testing.assert_close(mean, m)
    torch.testing.assert_close(var, v)
    torch.testing.assert_close(mean_square(x, dims), (x * x).sum(dims, keepdim=True) / (x.numel() / m.numel()))


@pytest.mark.parametrize("dims", [(2,), (2, 3), (0, 2, 3)])
def test_fused_moments_match_hand_formula(dims):
    # both copies (the one the output uses and the returned one) are the biased two-pass moments
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 3 + 100  # a large mean: no E[x²] − E[x]² shortcut
    m, v = _by_hand(x, dims, 0)
    fm = fused_moments(x, dims)
    for mean, var in ((fm.inner_mean, fm.inner_var), (fm.mean, fm.var)):
        torch.testing.assert_close(mean, m)
        torch.testing.assert_close(var, v, rtol=1e-12, atol=0)
    rms = fused_moments(x, dims, center=False)
    assert rms.inner_mean is None and rms.mean is None
    ms = (x * x).sum(dims, keepdim=True) / (x.numel() / m.numel())
    torch.testing.assert_close(rms.inner_var, ms)
    torch.testing.assert_close(rms.var, ms)
    # unfused (eager) and half-precision input: one copy, straight from the engine's moments / mean_square
    for xx, fused in ((x, False), (x.half(), True)):
        one = fused_moments(xx, dims, fused=fused)
        m1, v1 = moments(xx, dims)
        assert one.inner_mean is one.mean and one.inner_var is one.var
        torch.testing.assert_close(one.mean, m1, rtol=0, atol=0)
        torch.testing.assert_close(one.var, v1, rtol=0, atol=0)
        torch.testing.assert_close(fused_moments(xx, dims, center=False, fused=fused).var, mean_square(xx, dims), rtol=0, atol=0)


def test_accumulation_dtype():
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64
    assert accumulation_dtype(torch.float16, torch.float64) == torch.float64
    x = torch.randn(4, 1000).to(torch.bfloat16)
    mean, var = moments(x, 1)
    assert mean.dtype == var.dtype == torch.float32
    ref_m, ref_v = _by_hand(x.double(), (1,), 0)
    torch.testing.assert_close(var.double(), ref_v, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6), c=st.integers(1, 4), l=st.integers(2, 7), seed=st.integers(0, 2**16),
    correction=st.sampled_from([0, 1]),
)
def test_mask_equals_dropping_positions(n, c, l, seed, correction):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, l, generator=g, dtype=torch.float64)
    mask = torch.rand(n, 1, l, generator=g) < 0.6
    mask[0, 0, :2] = True  # at least two included positions
    mean, var = moments(x, (0, 2), mask=mask, correction=correction)
    kept = x.permute(1, 0, 2)[:, mask[:, 0, :]]  # (C, kept positions)
    torch.testing.assert_close(mean.reshape(c), kept.mean(1))
    torch.testing.assert_close(var.reshape(c), kept.var(1, correction=correction))
    ms = mean_square(x, (0, 2), mask=mask)
    torch.testing.assert_close(ms.reshape(c), (kept**2).mean(1))


def test_reducer_receives_sums_and_weights_by_count():
    # Two "processes" with uneven shares of one batch: a reducer that adds the other
    # process's sums must give the statistics of the whole batch.
    x = torch.randn(10, 3, dtype=torch.float64)
    a, b = x[:3], x[3:]
    calls = []

    def make_reducer(other):
        def reduce(t):
            calls.append(t.shape)
            return t + other.pop(0)
        return reduce

    # record what process b contributes, then replay it from process a's side
    sent = []
    moments(b, 0, reducer=lambda t: (sent.append(t.clone()), t)[1])
    # first pass (sum, count) from b is exact; the second (squared deviations) depends on the
    # global mean, so recompute it for b with that mean
    total = sent[0]  # packed flat: the count (one number without a mask), then the sum per column
    glob_mean = (a.sum(0) + total[1:]) / (3 + total[0])
    b_sq = ((b - glob_mean) ** 2).sum(0, keepdim=True)
    mean, var = moments(a, 0, correction=1, reducer=make_reducer([total, b_sq]))
    torch.testing.assert_close(mean.reshape(-1), x.mean(0))
    torch.testing.assert_close(var.reshape(-1), x.var(0))
    assert len(calls) == 2


def test_bad_mask():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="bool"):
        moments(x, 0, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="broadcast"):
        moments(x, 0, mask=torch.ones(4, 3, dtype=torch.bool))


def test_fused_moments_do_not_overflow_where_var_mean_does_not():
    # Σx² overflows float32 for |x| ~ 1e19 (8 values of 1.9e19 squared); var_mean's variance does not
    x = torch.tensor([[1.9e19, -1.5e19, 0.7e19, -0.2e19, 1.1e19, -1.8e19, 0.3e19, 0.9e19]])
    var, mean = torch.var_mean(x, 1, correction=0, keepdim=True)
    assert torch.isfinite(var).all()
    for center in (True, False):
        fm = fused_moments(x, 1, center=center)
        want = var if center else (x.double() ** 2).mean(1, keepdim=True).float()
        for v in (fm.inner_var, fm.var):
            assert torch.isfinite(v).all()
            torch.testing.assert_close(v, want, rtol=1e-5, atol=0)
