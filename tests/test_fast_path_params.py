"""The fast paths read parameters from ``Module._parameters`` (issue 11: ``self.weight`` costs a failed
lookup and ``Module.__getattr__``, ~0.8 µs): results equal the plain formulas written here, the same errors
for bad input, and exactness when something else owns the parameters (``torch.func.functional_call``, a
parametrization, ``weight_norm``, a deleted parameter)."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normkit


def _dyt(x, a, w, b):
    return w * torch.tanh(a * x) + b


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ln(x, w, b, eps=1e-5):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _filled(m: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return m


@pytest.mark.parametrize("shape", [(2, 16, 64), (64,), (5, 64)])
def test_dyt_and_rmsnorm_hot_paths_equal_the_formulas(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    d = _filled(normkit.DyT(64, dtype=torch.float64))
    r = _filled(normkit.RMSNorm(64, eps=1e-6, dtype=torch.float64))
    ln = _filled(normkit.LayerNorm(64, dtype=torch.float64))
    assert d._nk_below > x.numel() and r._nk_below > x.numel() and ln._nk_below > x.numel()  # the hot paths
    for m, want in ((d, _dyt(x, d.alpha, d.weight, d.bias)), (r, _rms(x, r.weight, 1e-6)),
                    (ln, _ln(x, ln.weight, ln.bias))):
        y = m(x)
        torch.testing.assert_close(y, want)
        g = torch.randn_like(y)
        ps = [x, *m.parameters()]
        for got, exp in zip(torch.autograd.grad(y, ps, g), torch.autograd.grad(want, ps, g)):
            torch.testing.assert_close(got, exp)
    with torch.no_grad():
        torch.testing.assert_close(d(x), _dyt(x, d.alpha, d.weight, d.bias))
        torch.testing.assert_close(r(x), _rms(x, r.weight, 1e-6))
    y, s = r.forward_add(x, 2 * x)
    torch.testing.assert_close(s, 3 * x)
    torch.testing.assert_close(y, _rms(3 * x, r.weight, 1e-6))


def test_dyt_float32_input_with_float64_parameters_keeps_the_input_dtype():
    d = _filled(normkit.DyT(8, dtype=torch.float64))
    x = torch.randn(3, 8)
    y = d(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _dyt(x.double(), d.alpha, d.weight, d.bias).float())


def test_hot_paths_keep_the_clear_errors():
    for bad in (torch.randn(3, 7), torch.randn(()), torch.randn(3, 1)):  # (3, 1) would broadcast silently
        with pytest.raises(ValueError, match="DyT expects"):
            normkit.DyT(8)(bad)
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 8\), got \(3, 7\)"):
        normkit.RMSNorm(8)(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 8\), got \(\)"):
        normkit.LayerNorm(8)(torch.randn(()))
    with pytest.raises(ValueError, match="expects input of shape"):
        normkit.ScaleNorm(8)(torch.randn(()))


def test_functional_call_swaps_the_parameters_the_hot_paths_read():
    x = torch.randn(4, 8)
    w, b, a = torch.rand(8) + 0.5, torch.randn(8), torch.tensor([0.3])
    d, r, ln = normkit.DyT(8), normkit.RMSNorm(8, eps=1e-6), normkit.LayerNorm(8)
    f = torch.func.functional_call
    torch.testing.assert_close(f(d, {"alpha": a, "weight": w, "bias": b}, (x,)), _dyt(x, a, w, b))
    torch.testing.assert_close(f(r, {"weight": w}, (x,)), _rms(x, w, 1e-6))
    torch.testing.assert_close(f(ln, {"weight": w, "bias": b}, (x,)), _ln(x, w, b))
    torch.testing.assert_close(d(x), torch.tanh(0.5 * x))  # the module's own parameters are back


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")  # the old hook API is the case
@pytest.mark.parametrize("cls", [normkit.DyT, normkit.RMSNorm, normkit.LayerNorm])
def test_parametrized_and_weight_normed_parameters_take_the_full_path(cls):
    x = torch.randn(4, 8)
    m = _filled(cls(8))
    want = m(x).detach()
    parametrize.register_parametrization(m, "weight", _Double())  # weight leaves _parameters, becomes a property
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(0.5)
    torch.testing.assert_close(m(x), want)
    parametrize.remove_parametrizations(m, "weight")
    assert m._nk_below > 0  # the weight is a parameter again: the plan is back
    torch.testing.assert_close(m(x), want)

    wn = torch.nn.utils.weight_norm(_filled(cls(8)), "weight", dim=0)  # deletes _parameters["weight"] directly
    w = wn.weight_g * wn.weight_v / wn.weight_v.abs()  # a 1-D weight, dim=0: g · v / |v| per element
    y = wn(x)
    if cls is normkit.DyT:
        torch.testing.assert_close(y, _dyt(x, wn.alpha, w, wn.bias))
    elif cls is normkit.RMSNorm:
        torch.testing.assert_close(y, _rms(x, w, torch.finfo(x.dtype).eps))
    else:
        torch.testing.assert_close(y, _ln(x, w, wn.bias))


def test_deleting_a_parameter_re_plans():
    d = normkit.DyT(8)
    del d.bias  # no bias attribute at all: not the fast path, and not a KeyError escaping from it
    assert d._nk_below == 0
    with pytest.raises(AttributeError):
        d(torch.randn(2, 8))
    d.bias = nn.Parameter(torch.zeros(8))
    assert d._nk_below > 0
    torch.testing.assert_close(d(torch.ones(2, 8)), torch.tanh(torch.full((2, 8), 0.5)))


def test_compiled_hot_paths_have_no_graph_break():
    torch._dynamo.reset()
    x = torch.randn(2, 16, 64, requires_grad=True)
    for m in (normkit.DyT(64), normkit.RMSNorm(64, eps=1e-6), normkit.LayerNorm(64)):
        c = torch.compile(m, fullgraph=True, backend="eager")
        torch.testing.assert_close(c(x), m(x))
