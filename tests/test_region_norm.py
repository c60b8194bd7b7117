"""Region Normalization (RN-B, RN-L) against plain re-statements of the official geekyutao/RN code and the paper."""

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.region_norm import region_norm_b, region_norm_l, region_normalize
from normkit.nn.region_norm import RegionNormB, RegionNormL

D = torch.float64


# ---- plain statements -------------------------------------------------------------------------


def official_rn(x, label, eps=1e-5):
    """rn.py::RN_binarylabel written out: BatchNorm of the mean-filled region, rescaled by sqrt(S/BHW)."""

    def rn(region, mask):
        b, _, h, w = region.shape
        total = region.sum(dim=[0, 2, 3])
        sr = mask.sum(dim=[0, 2, 3]).clone()
        sr[sr == 0] = 1
        mu = total / sr
        filled = region + (1 - mask) * mu[None, :, None, None]
        normed = TF.batch_norm(filled, None, None, training=True, eps=eps)
        return normed * torch.sqrt(sr / (b * h * w))[None, :, None, None]

    return rn(x * label, label) + rn(x * (1 - label), 1 - label)


def official_rn_b(x, mask, fg, fb, bg, bb, eps=1e-5):
    mask = TF.interpolate(mask, size=x.shape[2:], mode="nearest")
    r = official_rn(x, mask, eps)
    c = lambda p: p[None, :, None, None]  # noqa: E731
    return (r * mask) * (1 + c(fg)) + c(fb) + (r * (1 - mask)) * (1 + c(bg)) + c(bb)


def official_rn_l(x, w_sa, w_g, b_g, w_b, b_b, threshold=0.8, eps=1e-5):
    avg = torch.mean(x, dim=1, keepdim=True)
    mx, _ = torch.max(x, dim=1, keepdim=True)
    sa_map = torch.sigmoid(TF.conv2d(torch.cat([avg, mx], dim=1), w_sa, padding=w_sa.shape[-1] // 2))
    gamma = TF.conv2d(sa_map, w_g, b_g, padding=w_g.shape[-1] // 2)
    beta = TF.conv2d(sa_map, w_b, b_b, padding=w_b.shape[-1] // 2)
    mask = torch.zeros_like(sa_map)
    mask[sa_map.detach() >= threshold] = 1
    return official_rn(x, mask.expand(x.size()), eps) * (1 + gamma) + beta


def separately_normalized(x, mask, eps, per_sample):
    """Each region normalized on its own: (x − μ_r) / sqrt(σ²_r + eps·count/S_r), with plain indexing."""
    out = torch.zeros_like(x)
    n, c = x.shape[:2]
    groups = [(i,) for i in range(n)] if per_sample else [tuple(range(n))]
    for samples in groups:
        idx = list(samples)
        for ch in range(c):
            vals = x[idx, ch]
            m = mask[idx, 0].bool()
            count = m.numel()
            for region in (m, ~m):
                if region.sum() == 0:
                    continue
                v = vals[region]
                mean = v.mean()
                var = ((v - mean) ** 2).mean()
                normed = (v - mean) / torch.sqrt(var + eps * count / region.sum())
                block = out[idx, ch]
                block[region] = normed
                out[idx, ch] = block
    return out


def _params(c, dtype=D):
    return [(torch.randn(c, dtype=dtype) * 0.5).requires_grad_() for _ in range(4)]


def _mask(n, h, w, p=0.4):
    m = (torch.rand(n, 1, h, w) < p).to(D)
    m.view(n, -1)[:, 0] = 1
    m.view(n, -1)[:, -1] = 0
    return m


# ---- RN-B ---------------------------------------------------------------------------------------


def test_rn_b_matches_official_code_including_mask_resizing():
    x = torch.randn(3, 5, 6, 7, dtype=D) * 2 + 1
    fg, fb, bg, bb = _params(5)
    mask = _mask(3, 6, 7)
    torch.testing.assert_close(region_norm_b(x, mask, fg, fb, bg, bb), official_rn_b(x, mask, fg, fb, bg, bb))
    big = _mask(3, 12, 14)  # official: F.interpolate(mask, size=x.size()[2:], mode='nearest')
    torch.testing.assert_close(region_norm_b(x, big, fg, fb, bg, bb), official_rn_b(x, big, fg, fb, bg, bb))
    m = RegionNormB(5).double()
    with torch.no_grad():
        for p, q in zip((m.foreground_gamma, m.foreground_beta, m.background_gamma, m.background_beta), (fg, fb, bg, bb)):
            p.copy_(q)
    torch.testing.assert_close(m(x, big), official_rn_b(x, big, fg, fb, bg, bb))
    # bool masks are accepted as 1 = hole
    torch.testing.assert_close(m(x, big.bool()), m(x, big))


def test_rn_b_module_defaults_and_no_running_statistics():
    m = RegionNormB(4)
    assert all(torch.all(p == 0) for p in m.parameters())
    assert dict(m.named_buffers()) == {}
    x, mask = torch.randn(2, 4, 5, 5), _mask(2, 5, 5).float()
    y_train = m(x, mask)
    m.eval()
    torch.testing.assert_close(m(x, mask), y_train)  # batch statistics in eval too, as the official code


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    h=st.integers(2, 4),
    w=st.integers(2, 4),
    p=st.floats(0.1, 0.9),
    per_sample=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rn_equals_separately_normalizing_each_region(n, h, w, p, per_sample, seed):
    torch.manual_seed(seed)
    x = torch.randn(n, 3, h, w, dtype=D) * 3 - 1
    mask = _mask(n, h, w, p)
    want = separately_normalized(x, mask, 1e-5, per_sample)
    torch.testing.assert_close(region_normalize(x, mask, 1e-5, per_sample=per_sample), want)
    # zero parameters: RN-B is the bare region normalization
    zeros = [torch.zeros(3, dtype=D) for _ in range(4)]
    torch.testing.assert_close(region_norm_b(x, mask, *zeros, per_sample=per_sample), want)


def test_rn_b_in_style_is_per_sample():
    x = torch.randn(3, 2, 4, 4, dtype=D)
    mask = _mask(3, 4, 4)
    y = region_normalize(x, mask, per_sample=True)
    for i in range(3):
        torch.testing.assert_close(y[i : i + 1], region_normalize(x[i : i + 1], mask[i : i + 1]))


def test_rn_b_masked_bias_switch():
    x = torch.randn(2, 3, 4, 4, dtype=D)
    fg, fb, bg, bb = _params(3)
    mask = _mask(2, 4, 4)
    r = region_normalize(x, mask)
    c = lambda p: p[None, :, None, None]  # noqa: E731
    want = mask * (r * (1 + c(fg)) + c(fb)) + (1 - mask) * (r * (1 + c(bg)) + c(bb))
    torch.testing.assert_close(region_norm_b(x, mask, fg, fb, bg, bb, masked_bias=True), want)
    # official: both biases everywhere
    want_off = mask * r * (1 + c(fg)) + (1 - mask) * r * (1 + c(bg)) + c(fb) + c(bb)
    torch.testing.assert_close(region_norm_b(x, mask, fg, fb, bg, bb), want_off)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_region_gives_no_nan(fill):
    x = torch.randn(2, 3, 4, 4, dtype=D, requires_grad=True)
    mask = torch.full((2, 1, 4, 4), fill, dtype=D)
    y = region_norm_b(x, mask, *_params(3))
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    # the non-empty region is the whole tensor: plain batch normalization
    torch.testing.assert_close(region_normalize(x, mask), TF.batch_norm(x, None, None, training=True, eps=1e-5))
    # a region that vanishes after nearest down-sampling
    tiny = torch.zeros(2, 1, 8, 8, dtype=D)
    tiny[:, :, 1, 1] = 1
    assert torch.isfinite(region_normalize(x, tiny)).all()


def test_rn_b_gradcheck():
    x = torch.randn(2, 3, 3, 4, dtype=D, requires_grad=True)
    mask = _mask(2, 3, 4)
    params = _params(3)
    for per_sample in (False, True):
        assert torch.autograd.gradcheck(lambda x, *p, ps=per_sample: region_norm_b(x, mask, *p, per_sample=ps), (x, *params))


def test_rn_b_other_ranks_and_half():
    x = torch.randn(2, 3, 6)
    mask = (torch.rand(2, 1, 6) < 0.5).float()
    y = RegionNormB(3)(x, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    xh = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    mh = _mask(2, 4, 4).to(torch.bfloat16)
    y = RegionNormB(3, dtype=torch.bfloat16)(xh, mh)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), region_normalize(xh.float(), mh.float()), atol=2e-2, rtol=2e-2)


def test_rn_b_errors():
    m = RegionNormB(4)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="needs the inpainting mask"):
        m(x)
    with pytest.raises(ValueError, match=r"\(N, 4, \*spatial\)"):
        m(torch.randn(2, 5, 3, 3), torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(N=2, 1 or 4"):
        m(x, torch.ones(2, 2, 3, 3))
    with pytest.raises(ValueError, match="mask of shape"):
        m(x, torch.ones(3, 1, 3, 3))
    with pytest.raises(ValueError, match="mask of shape"):
        m(x, torch.ones(2, 3, 3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        m(x, [[1.0]])
    with pytest.raises(TypeError, match="floating-point"):
        m(x.long(), torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="eps"):
        RegionNormB(4, eps=-1.0)
    with pytest.raises(ValueError, match="foreground_gamma must have 4 elements"):
        region_norm_b(x, torch.ones(2, 1, 3, 3), torch.zeros(3))


# ---- RN-L ---------------------------------------------------------------------------------------


def _rn_l_module(c=4, seed=0):
    torch.manual_seed(seed)
    m = RegionNormL(c).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_rn_l_matches_official_code_and_state_dict_keys():
    m = _rn_l_module()
    assert set(m.state_dict()) == {
        "sa.conv1.weight",
        "sa.gamma_conv.weight",
        "sa.gamma_conv.bias",
        "sa.beta_conv.weight",
        "sa.beta_conv.bias",
    }
    assert m.threshold == 0.8 and m.sa.conv1.weight.shape == (1, 2, 7, 7)
    x = torch.randn(3, 4, 6, 5, dtype=D) * 2
    sa = m.sa
    want = official_rn_l(x, sa.conv1.weight, sa.gamma_conv.weight, sa.gamma_conv.bias, sa.beta_conv.weight, sa.beta_conv.bias)
    torch.testing.assert_close(m(x), want)
    # both regions are present for this input, so the split matters
    s = torch.sigmoid(TF.conv2d(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1), sa.conv1.weight, padding=3))
    assert 0 < (s >= 0.8).sum() < s.numel()


def test_rn_l_threshold_is_not_differentiable():
    m = _rn_l_module()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    with torch.no_grad():
        m.sa.gamma_conv.weight.zero_()
        m.sa.beta_conv.weight.zero_()
    m(x).square().sum().backward()
    # the split has no gradient: with gamma/beta convs cut off, conv1 receives none
    assert m.sa.conv1.weight.grad is None or torch.all(m.sa.conv1.weight.grad == 0)


@pytest.mark.slow
def test_rn_l_gradcheck():
    m = _rn_l_module()
    x = torch.randn(2, 4, 4, 4, dtype=D, requires_grad=True)
    sa = m.sa
    s = torch.sigmoid(TF.conv2d(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1), sa.conv1.weight, padding=3))
    assert (s - 0.8).abs().min() > 1e-3  # finite differences do not flip the split
    # max over channels: ties would make the numerical gradient ambiguous
    top2 = x.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3

    def f(x, w1, wg, bg, wb, bb):
        return region_norm_l(x, w1, wg, bg, wb, bb)

    args = (x, sa.conv1.weight, sa.gamma_conv.weight, sa.gamma_conv.bias, sa.beta_conv.weight, sa.beta_conv.bias)
    assert torch.autograd.gradcheck(f, args)


def test_rn_l_official_init_and_1d_input():
    torch.manual_seed(0)
    m = RegionNormL(8, official_init=True, kernel_size=3)
    assert m.sa.conv1.weight.shape == (1, 2, 3, 3)
    std = m.sa.conv1.weight.std().item()
    assert 0.01 < std < 0.2  # kaiming (fan_in 18: std 0.33) scaled by 0.1
    y = m(torch.randn(2, 8, 5))
    assert y.shape == (2, 8, 5) and torch.isfinite(y).all()
    assert "official_init=True" in repr(m) and "kernel_size=3" in repr(m)


def test_rn_l_errors():
    m = RegionNormL(4)
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\) or \(N, 4, L\)"):
        m(torch.randn(2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        m(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="threshold"):
        RegionNormL(4, threshold=1.5)
    with pytest.raises(ValueError, match="kernel_size must be 3 or 7"):
        RegionNormL(4, kernel_size=5)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"sa_weight must be a \(1, 2, k, k\)"):
        region_norm_l(x, torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, torch.zeros(1, 1, 3, 3), None)


def test_rn_mask_statistics_count_matches_closed_form():
    # the effective epsilon is eps·count/S (official BN on the mean-filled tensor)
    x = torch.randn(1, 1, 2, 2, dtype=D)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]], dtype=D)
    eps = 0.5
    v = x[0, 0, 0]
    want = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps * 4 / 2)
    torch.testing.assert_close(region_normalize(x, mask, eps)[0, 0, 0], want)
    assert math.isclose(float(mask.sum()), 2.0)
