"""Batch-Channel Normalization (bcn) and EstBN (estbn) against plain restatements of the official code."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.batch_channel_norm import batch_channel_norm, channel_norm, estimated_batch_norm
from normkit.nn.batch_channel_norm import BatchChannelNorm, EstBN
from normkit.registry import create_norm, norm_info

D = torch.float64


# --------------------------------------------------------------------------- plain restatements


def ref_bn_train(x, w, b, eps=1e-5):
    # per channel c: mean and biased variance over (N, H, W)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def ref_bn_eval(x, rm, rv, w, b, eps=1e-5):
    return (x - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def ref_channel_norm(a, groups, gw, gb, eps=1e-5):
    # per sample n and group g: mean and biased variance over the group's channels and all positions,
    # then one scale and one shift per group
    n = a.shape[0]
    ag = a.reshape(n, groups, -1)
    mean = ag.mean(-1, keepdim=True)
    var = ((ag - mean) ** 2).mean(-1, keepdim=True)
    y = (ag - mean) / torch.sqrt(var + eps)
    y = gw.reshape(1, groups, 1) * y + gb.reshape(1, groups, 1)
    return y.reshape(a.shape)


class OfficialGN(torch.nn.Module):
    """The official BCN layer (imagenet/models/layers.py, class GN) written with torch ops."""

    def __init__(self, num_channels, num_groups):
        super().__init__()
        self.num_groups = num_groups
        self.weight = torch.nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = torch.nn.Parameter(torch.zeros(1, num_groups, 1))
        self.pbn = torch.nn.BatchNorm2d(num_channels)

    def forward(self, inp):
        out = self.pbn(inp)
        out = out.view(1, inp.size(0) * self.num_groups, -1)
        out = torch.batch_norm(out, None, None, None, None, True, 0, 1e-5, True)
        out = out.view(inp.size(0), self.num_groups, -1)
        out = self.weight * out + self.bias
        return out.view_as(inp)


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)


# --------------------------------------------------------------------------- BCN


def test_registered():
    info = norm_info("bcn")
    assert info.cls is BatchChannelNorm and info.layout == "channels_first" and info.paper.arxiv == "1903.10520"
    assert info.sample_kwargs(8) == {"num_groups": 8}
    assert create_norm("bcn", 64).num_groups == 32  # official G = 32
    assert norm_info("estbn").cls is EstBN
    assert norm_info("batch_channel_norm").name == "bcn"


def test_train_eval_and_running_stats_step_by_step():
    c, g = 8, 4
    m = BatchChannelNorm(c, g).double()
    _randomize(m)
    rm, rv = torch.zeros(c, dtype=D), torch.ones(c, dtype=D)
    for _ in range(3):
        x = torch.randn(4, c, 3, 5, dtype=D) * 2 + 1
        y = m(x)
        a = ref_bn_train(x, m.pbn.weight, m.pbn.bias)
        torch.testing.assert_close(y, ref_channel_norm(a, g, m.weight, m.bias))
        # running statistics: r <- 0.9 r + 0.1 batch, with the unbiased batch variance
        count = x.numel() // c
        bm = x.mean(dim=(0, 2, 3))
        bv = ((x - bm.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (count - 1)
        rm, rv = 0.9 * rm + 0.1 * bm, 0.9 * rv + 0.1 * bv
        torch.testing.assert_close(m.pbn.running_mean, rm)
        torch.testing.assert_close(m.pbn.running_var, rv)
    assert int(m.pbn.num_batches_tracked) == 3
    m.eval()
    x = torch.randn(2, c, 3, 5, dtype=D)
    a = ref_bn_eval(x, rm, rv, m.pbn.weight, m.pbn.bias)
    torch.testing.assert_close(m(x), ref_channel_norm(a, g, m.weight, m.bias))
    torch.testing.assert_close(m.pbn.running_mean, rm)  # eval does not update


def test_matches_official_layer_and_loads_its_checkpoint():
    ours, theirs = BatchChannelNorm(8, 4), OfficialGN(8, 4)
    _randomize(theirs)
    with torch.no_grad():
        theirs.pbn.running_mean.uniform_(-1, 1)
        theirs.pbn.running_var.uniform_(0.5, 2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 8, 4, 4)
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.pbn.running_var, theirs.pbn.running_var)


def test_functional_matches_module_and_any_rank():
    m = BatchChannelNorm(6, 3).double()
    _randomize(m)
    x = torch.randn(5, 6, 7, dtype=D)  # (N, C, L)
    rm, rv = torch.zeros(6, dtype=D), torch.ones(6, dtype=D)
    y = batch_channel_norm(x, 3, rm, rv, m.pbn.weight, m.pbn.bias, m.weight, m.bias, True, 0.1, 1e-5)
    torch.testing.assert_close(y, m(x))
    torch.testing.assert_close(rm, m.pbn.running_mean)
    a = ref_bn_train(x.unsqueeze(-1), m.pbn.weight, m.pbn.bias).squeeze(-1)
    torch.testing.assert_close(y, ref_channel_norm(a, 3, m.weight, m.bias))


def test_gradcheck_float64():
    x = torch.randn(3, 4, 2, 3, dtype=D, requires_grad=True)
    bw, bb = (torch.rand(4, dtype=D) + 0.5).requires_grad_(), torch.randn(4, dtype=D, requires_grad=True)
    gw, gb = (torch.rand(1, 2, 1, dtype=D) + 0.5).requires_grad_(), torch.randn(1, 2, 1, dtype=D, requires_grad=True)

    def f(x, bw, bb, gw, gb):
        return batch_channel_norm(x, 2, None, None, bw, bb, gw, gb, True)

    assert torch.autograd.gradcheck(f, (x, bw, bb, gw, gb))
    assert torch.autograd.gradcheck(lambda x, gw, gb: channel_norm(x, 2, gw, gb), (x, gw, gb))


def test_state_dict_round_trip_resumes_exactly():
    m = BatchChannelNorm(8, 2, estimate=True, moving_speed=0.3)
    for _ in range(2):
        m(torch.randn(4, 8, 3, 3))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {
        "weight",
        "bias",
        "pbn.weight",
        "pbn.bias",
        "pbn.running_mean",
        "pbn.running_var",
        "pbn.num_batches_tracked",
        "pbn.estbn_moving_speed",
    }
    m2 = BatchChannelNorm(8, 2, estimate=True, moving_speed=0.9)
    m2.load_state_dict(sd)
    assert float(m2.pbn.estbn_moving_speed) == pytest.approx(0.3)
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(m(x), m2(x))
    torch.testing.assert_close(m.pbn.running_var, m2.pbn.running_var)


def test_errors():
    with pytest.raises(ValueError, match="num_groups=3 must be a positive divisor of num_channels=8"):
        BatchChannelNorm(8, 3)
    with pytest.raises(ValueError, match=r"expects 8 channels at dim 1.*got 6"):
        BatchChannelNorm(8, 2)(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="does not support a reducer"):
        BatchChannelNorm(8, 2, estimate=True, reducer=lambda t: t)
    with pytest.raises(ValueError, match="moving_speed must be a number in"):
        EstBN(8, moving_speed=1.5)
    with pytest.raises(ValueError, match="one value per group"):
        channel_norm(torch.randn(2, 8, 3), 4, torch.ones(8))
    with pytest.raises(TypeError, match="floating-point"):
        BatchChannelNorm(8, 2)(torch.ones(2, 8, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchChannelNorm(8, 2)(torch.randn(1, 8, 1, 1))


def test_nan_is_not_masked():
    x = torch.randn(2, 8, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    assert torch.isnan(BatchChannelNorm(8, 2)(x)).any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4))
def test_bcn_is_invariant_to_per_channel_affine_input_changes(seed, n):
    # BN removes any per-channel positive scale and shift in training, so BCN does too
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, 3, generator=g, dtype=D)
    a = torch.rand(1, 6, 1, 1, generator=g, dtype=D) * 3 + 0.3
    c = torch.randn(1, 6, 1, 1, generator=g, dtype=D) * 5
    m = BatchChannelNorm(6, 3, eps=1e-12).double()
    torch.testing.assert_close(m(a * x + c), m(x), atol=1e-7, rtol=1e-7)


# --------------------------------------------------------------------------- EstBN


def test_estbn_update_rule_step_by_step():
    c, r = 4, 0.25
    m = EstBN(c, moving_speed=r).double()
    _randomize(m)
    mu, s2 = torch.zeros(c, dtype=D), torch.ones(c, dtype=D)
    for _ in range(3):
        x = (torch.randn(2, c, 3, 3, dtype=D) * 3 + 2).requires_grad_()
        y = m(x)
        # official README EstBN: variance centred on the OLD running mean, then normalize with the NEW estimates
        bm = x.detach().mean(dim=(0, 2, 3))
        bv = ((x.detach() - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        mu, s2 = (1 - r) * mu + r * bm, (1 - r) * s2 + r * bv
        torch.testing.assert_close(m.running_mean, mu)
        torch.testing.assert_close(m.running_var, s2)
        torch.testing.assert_close(y, ref_bn_eval(x, mu, s2, m.weight, m.bias))
        # no gradient through the statistics: dy/dx is the per-channel constant w / sqrt(s2 + eps)
        (gx,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(gx, (m.weight / torch.sqrt(s2 + 1e-5)).view(1, -1, 1, 1).expand_as(x).detach())
    m.eval()
    x = torch.randn(2, c, 3, 3, dtype=D)
    torch.testing.assert_close(m(x), ref_bn_eval(x, mu, s2, m.weight, m.bias))
    torch.testing.assert_close(m.running_mean, mu)


def test_estbn_zero_speed_is_the_official_default_buffer_and_freezes_estimates():
    m = EstBN(3, moving_speed=0.0)
    x = torch.randn(4, 3, 2, 2) + 5
    y = m(x)
    assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
    torch.testing.assert_close(y, x / (1 + 1e-5) ** 0.5)
    # a schedule writes the buffer (as the official training code must)
    m.estbn_moving_speed.fill_(1.0)
    m(x)
    torch.testing.assert_close(m.running_mean, x.mean(dim=(0, 2, 3)))


def test_estbn_functional_accepts_float_rate():
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(2, 3, 4)
    estimated_batch_norm(x, rm, rv, training=True, moving_speed=0.5)
    torch.testing.assert_close(rm, 0.5 * x.mean(dim=(0, 2)))
