"""CRMSNorm and the Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversions (Jiang et al. 2023, arXiv:2305.14858).

Equations (official ``ZixuanJiang/pre-rmsnorm-transformer``, ``example.py``):

  LN(x)      = (x - mean(x)) / sqrt(var(x) + eps)                     x in R^d
  RMSNorm(x) = x / sqrt(mean(x^2) + eps)
  CRMSNorm(z)= z / sqrt((sum(z^2) + sum(z)^2) / d + eps)             z in R^(d-1), d = len(z) + 1

  For zero-mean x: LN(x) == RMSNorm(x), and with z = x[:-1] (x[-1] = -sum(z)):
  CRMSNorm(z) == RMSNorm(x)[:-1].
"""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.crms_norm import (
    center_writer,
    compress_reader,
    compress_writer,
    compress_zero_mean,
    crms_norm,
    decompress,
    fold_ln_affine,
)
from normkit.nn.crms_norm import CRMSNorm

D = torch.float64


def ref_ln(x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def ref_rms(x, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_crms(z, eps=1e-5):
    d = z.shape[-1] + 1
    return z / torch.sqrt(((z * z).sum(-1, keepdim=True) + z.sum(-1, keepdim=True) ** 2) / d + eps)


def test_crms_against_equation_and_module():
    z = torch.randn(4, 3, 7, dtype=D) * 3
    torch.testing.assert_close(crms_norm(z), ref_crms(z))
    torch.testing.assert_close(crms_norm(z, eps=1e-3), ref_crms(z, 1e-3))
    m = CRMSNorm(7).double()
    assert m.num_features == 7 and list(m.state_dict()) == []  # no affine by default (paper)
    torch.testing.assert_close(m(z), ref_crms(z))
    ma = CRMSNorm(7, elementwise_affine=True, bias=True).double()
    with torch.no_grad():
        ma.weight.uniform_(0.5, 1.5)
        ma.bias.normal_()
    torch.testing.assert_close(ma(z), ref_crms(z) * ma.weight + ma.bias)
    assert "d=8" in repr(m)


def test_ln_equals_rms_of_centered_equals_crms_of_compressed():
    x = torch.randn(5, 9, dtype=D) * 2 + 3  # d = 9, not zero-mean
    ln = TF.layer_norm(x, (9,), eps=1e-5)
    xc = x - x.mean(-1, keepdim=True)  # LN -> RMS: zero-mean the vector
    torch.testing.assert_close(ref_rms(xc), ln)
    torch.testing.assert_close(TF.rms_norm(xc, (9,), eps=1e-5), ln)
    z = compress_zero_mean(xc)  # RMS -> CRMS: keep d - 1 = 8 coordinates
    assert z.shape == (5, 8)
    torch.testing.assert_close(decompress(z), xc)
    y = CRMSNorm(8).double()(z)
    torch.testing.assert_close(y, ln[:, :-1])
    torch.testing.assert_close(decompress(y), ln)  # the dropped output coordinate is -sum(y)


def _pre_ln_net(d=6, p=5, hidden=7, classes=3, depth=2):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=D)

    return {
        "emb_w": r(d, p),
        "emb_b": r(d),
        "pos": r(1, 4, d),
        "blocks": [
            {"g": r(d).abs() + 0.5, "b": r(d), "w1": r(hidden, d), "b1": r(hidden), "w2": r(d, hidden), "b2": r(d)}
            for _ in range(depth)
        ],
        "gf": r(d).abs() + 0.5,
        "bf": r(d),
        "head_w": r(classes, d),
        "head_b": r(classes),
    }


def _run(net, x, norm):
    """Pre-norm residual MLP: h = emb(x) + pos; h += W2 gelu(W1 norm(h)); out = head(norm(h))."""
    h = x @ net["emb_w"].T + net["emb_b"] + net["pos"]
    for blk in net["blocks"]:
        n = norm(h, blk.get("g"), blk.get("b"))
        h = h + TF.gelu(n @ blk["w1"].T + blk["b1"]) @ blk["w2"].T + blk["b2"]
    return norm(h, net.get("gf"), net.get("bf")) @ net["head_w"].T + net["head_b"]


def test_exact_model_conversion_pre_ln_to_pre_rms_to_pre_crms():
    net = _pre_ln_net()
    x = torch.randn(2, 4, 5, dtype=D)

    def ln_affine(h, g, b):
        return TF.layer_norm(h, h.shape[-1:], g, b, eps=1e-5)

    want = _run(net, x, ln_affine)

    # 1) fold each LN's affine into the linear that reads it; 2) recentre every writer (LN -> RMSNorm)
    rms = {"blocks": []}
    rms["emb_w"], rms["emb_b"] = center_writer(net["emb_w"], net["emb_b"])
    rms["pos"], _ = center_writer(net["pos"], dim=-1)
    for blk in net["blocks"]:
        w1, b1 = fold_ln_affine(blk["g"], blk["b"], blk["w1"], blk["b1"])
        w2, b2 = center_writer(blk["w2"], blk["b2"])
        rms["blocks"].append({"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    rms["head_w"], rms["head_b"] = fold_ln_affine(net["gf"], net["bf"], net["head_w"], net["head_b"])
    torch.testing.assert_close(_run(rms, x, lambda h, g, b: ref_rms(h)), want)

    # 3) compress writers (drop the last hidden unit) and readers (W[:, :-1] - W[:, -1:]); CRMSNorm(d - 1)
    crms = {"blocks": []}
    crms["emb_w"], crms["emb_b"] = compress_writer(rms["emb_w"], rms["emb_b"])
    crms["pos"], _ = compress_writer(rms["pos"], dim=-1)
    for blk in rms["blocks"]:
        w2, b2 = compress_writer(blk["w2"], blk["b2"])
        crms["blocks"].append({"w1": compress_reader(blk["w1"]), "b1": blk["b1"], "w2": w2, "b2": b2})
    crms["head_w"], crms["head_b"] = compress_reader(rms["head_w"]), rms["head_b"]
    assert crms["emb_w"].shape == (5, 5) and crms["pos"].shape == (1, 4, 5)
    norm = CRMSNorm(5).double()
    torch.testing.assert_close(_run(crms, x, lambda h, g, b: norm(h)), want)


def test_crms_gradcheck_float64():
    z = torch.randn(3, 6, dtype=D, requires_grad=True)
    w = (torch.rand(6, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w, b: crms_norm(z, w, b, 1e-5), (z, w, b))
    assert torch.autograd.gradcheck(lambda z: crms_norm(z), (z,))


def test_half_precision_statistics_in_float32_and_compiled_backend():
    z = torch.randn(16, 32) * 4
    ref = crms_norm(z)
    out = crms_norm(z.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(crms_norm(z, backend="compiled"), ref)


def test_errors_name_the_compressed_width():
    with pytest.raises(ValueError, match=r"\(\*, 7\).*d-1 = 7.*8-vector"):
        CRMSNorm(7)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="num_features"):
        CRMSNorm(0)
    with pytest.raises(TypeError, match="floating"):
        crms_norm(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must have 3"):
        crms_norm(torch.randn(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="d >= 2"):
        compress_zero_mean(torch.randn(3, 1))
    with pytest.raises(ValueError, match="eps"):
        CRMSNorm(4, eps=-1.0)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 12), scale=st.floats(0.01, 100.0), shift=st.floats(-5.0, 5.0))
def test_property_crms_of_compressed_equals_layernorm(d, scale, shift):
    x = torch.randn(3, d, dtype=D) * scale + shift
    xc = x - x.mean(-1, keepdim=True)
    ln = TF.layer_norm(x, (d,), eps=1e-5)
    torch.testing.assert_close(decompress(crms_norm(compress_zero_mean(xc))), ln)
    # scale invariance of the eps-free norm
    torch.testing.assert_close(crms_norm(3.0 * xc[..., :-1], eps=0.0), crms_norm(xc[..., :-1], eps=0.0))
