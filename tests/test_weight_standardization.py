"""Weight Standardization layers against the official code's three σ formulas, written plainly."""

import copy
import io

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.nn.weight_standardization import WSConv2d, WSLinear, standardize_weight, weight_standardize_

D = torch.float64


def ref_ws_readme(w):
    # WS README (PyTorch) / pytorch-classification: unbiased std, eps added to the std
    std, mean = torch.std_mean(w, dim=tuple(range(1, w.dim())), keepdim=True)
    return (w - mean) / (std + 1e-5)


def ref_ws_bcn_repo(w):
    # BCN repo imagenet/models/layers.py: sqrt(unbiased var + 1e-5)
    w = w - w.reshape(w.shape[0], -1).mean(1).reshape((-1,) + (1,) * (w.dim() - 1))
    std = torch.pow(w.reshape(w.shape[0], -1).var(dim=1) + 1e-5, 0.5).reshape((-1,) + (1,) * (w.dim() - 1))
    return w / std


def ref_ws_tf(w):
    # WS README (TensorFlow): keras.backend.std is the biased std, eps added to it
    dims = tuple(range(1, w.dim()))
    w = w - w.mean(dims, keepdim=True)
    return w / (torch.sqrt((w**2).mean(dims, keepdim=True)) + 1e-5)


VARIANTS = [
    ({}, ref_ws_readme),
    ({"eps_placement": "inside"}, ref_ws_bcn_repo),
    ({"unbiased": False}, ref_ws_tf),
]


@pytest.mark.parametrize("i", range(len(VARIANTS)))
def test_standardized_weight_matches_each_official_formula(i):
    kw, ref = VARIANTS[i]
    w = torch.randn(6, 3, 3, 3, dtype=D) * 0.1 + 0.05
    torch.testing.assert_close(standardize_weight(w, **kw), ref(w))
    conv = WSConv2d(3, 6, 3, padding=1, **kw).double()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    torch.testing.assert_close(conv(x), TF.conv2d(x, ref(conv.weight), conv.bias, padding=1))
    lin = WSLinear(7, 4, **kw).double()
    xl = torch.randn(3, 7, dtype=D)
    torch.testing.assert_close(lin(xl), xl @ ref(lin.weight).T + lin.bias)


def test_variants_really_differ():
    w = torch.randn(4, 3, dtype=D) * 0.01  # small weights: where eps placement matters
    a, b, c = (standardize_weight(w, **kw) for kw, _ in VARIANTS)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_grouped_strided_conv_and_padding_mode():
    conv = WSConv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect").double()
    x = torch.randn(2, 4, 7, 7, dtype=D)
    ref = TF.conv2d(TF.pad(x, (1, 1, 1, 1), mode="reflect"), ref_ws_readme(conv.weight), conv.bias, stride=2, groups=2)
    torch.testing.assert_close(conv(x), ref)


def test_gradcheck_float64():
    conv = WSConv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 4, 4, dtype=D, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()

    def f_conv(x, w, b):
        return TF.conv2d(x, standardize_weight(w), b, padding=1)

    assert torch.autograd.gradcheck(f_conv, (x, w, b))
    # the module routes its parameters through the same function
    torch.testing.assert_close(conv(x), f_conv(x, conv.weight, conv.bias))
    for kw, _ in VARIANTS:
        wl = torch.randn(3, 5, dtype=D, requires_grad=True)
        xl = torch.randn(4, 5, dtype=D, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, kw=kw: TF.linear(x, standardize_weight(w, **kw)), (xl, wl))
    lin = WSLinear(5, 3).double()
    assert torch.autograd.gradcheck(lin, (torch.randn(2, 5, dtype=D, requires_grad=True),))


def test_state_dict_is_torchs_both_ways():
    for ours, theirs, x in [
        (WSConv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
        (WSConv2d(3, 4, 1, bias=False), torch.nn.Conv2d(3, 4, 1, bias=False), torch.randn(2, 3, 5, 5)),
        (WSLinear(5, 2), torch.nn.Linear(5, 2), torch.randn(3, 5)),
    ]:
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
        ours.load_state_dict(theirs.state_dict(), strict=True)
        w = theirs.weight.detach()
        expected = (
            TF.conv2d(x, ref_ws_readme(w), theirs.bias, padding=theirs.padding)
            if x.dim() == 4
            else TF.linear(x, ref_ws_readme(w), theirs.bias)
        )
        torch.testing.assert_close(ours(x), expected)
        buf = io.BytesIO()
        torch.save(ours.state_dict(), buf)
        buf.seek(0)
        theirs.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        assert isinstance(ours, type(theirs))


class _MyConv(torch.nn.Conv2d):
    """A subclass with its own forward: weight_standardize_ must leave it alone."""


def _net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.GroupNorm(2, 4),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), _MyConv(4, 4, 1)),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 16, 8),
        torch.nn.Linear(8, 2),
    )


def test_weight_standardize_in_place():
    net = _net()
    before = copy.deepcopy(net)
    params = [id(p) for p in net.parameters()]
    out = weight_standardize_(net, exclude=("5",), eps_placement="inside")
    assert out is net and [id(p) for p in net.parameters()] == params
    assert type(net[0]) is WSConv2d and type(net[2][0]) is WSConv2d and type(net[2][1]) is _MyConv
    assert type(net[4]) is WSLinear and type(net[5]) is torch.nn.Linear
    assert net[0].eps_placement == "inside" and "eps_placement='inside'" in repr(net[0])
    assert net.state_dict().keys() == before.state_dict().keys()
    x = torch.randn(2, 3, 4, 4)
    # the same network written by hand with the BCN-repo formula on the converted layers
    h = TF.conv2d(x, ref_ws_bcn_repo(before[0].weight), before[0].bias, padding=1)
    h = before[1](h)
    h = TF.conv2d(h, ref_ws_bcn_repo(before[2][0].weight), before[2][0].bias)
    h = before[2][1](h).flatten(1)
    h = before[5](TF.linear(h, ref_ws_bcn_repo(before[4].weight), before[4].bias))
    torch.testing.assert_close(net(x), h)
    # only convs, and idempotent
    net2 = weight_standardize_(_net(), types=(torch.nn.Conv2d,), filter=lambda name, m: name != "0")
    assert type(net2[0]) is torch.nn.Conv2d and type(net2[2][0]) is WSConv2d and type(net2[4]) is torch.nn.Linear
    weight_standardize_(net2)
    assert type(net2[0]) is WSConv2d
    # a converted model pickles and deep-copies (the class is importable)
    copy.deepcopy(net)


def test_errors():
    with pytest.raises(ValueError, match="eps_placement must be 'outside'"):
        WSConv2d(3, 4, 3, eps_placement="middle")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        WSLinear(3, 4, eps=-1.0)
    with pytest.raises(ValueError, match="converts nn.Conv2d and nn.Linear only"):
        weight_standardize_(_net(), types=(torch.nn.Conv1d,))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        weight_standardize_("model")
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        WSLinear(1, 3)(torch.randn(2, 1))
    with pytest.raises(ValueError, match=r"weight of shape \(out, in, \*kernel\)"):
        standardize_weight(torch.randn(5))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), unbiased=st.booleans())
def test_invariant_to_per_output_affine_reparametrisation(seed, unbiased):
    # WS(a_o · W_o + c_o) = WS(W_o) for a_o > 0 (up to eps): the reparametrised weight only sees the direction
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=D)
    a = torch.rand(5, 1, 1, 1, generator=g, dtype=D) * 4 + 0.25
    c = torch.randn(5, 1, 1, 1, generator=g, dtype=D) * 3
    kw = {"eps": 0.0, "unbiased": unbiased}
    torch.testing.assert_close(standardize_weight(a * w + c, **kw), standardize_weight(w, **kw))
