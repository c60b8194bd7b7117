"""LOAN against a plain statement of the official HakamShams/LOAN module, running statistics step by step, resume."""

import io

import pytest
import torch
import torch.nn.functional as TF

from normkit.functional.loan import loan
from normkit.nn.loan import LOAN

D = torch.float64


def bn_plain(t, rm=None, rv=None, training=True, momentum=0.1, eps=1e-5):
    """BatchNorm without affine over every dim but 1; updates rm/rv in place (torch's convention)."""
    dims = [0] + list(range(2, t.dim()))
    shape = [1, -1] + [1] * (t.dim() - 2)
    if not training:
        return (t - rm.reshape(shape)) / torch.sqrt(rv.reshape(shape) + eps)
    mean = t.mean(dims)
    var = ((t - mean.reshape(shape)) ** 2).mean(dims)
    if rm is not None:
        count = t.numel() / t.shape[1]
        with torch.no_grad():
            rm.mul_(1 - momentum).add_(momentum * mean)
            rv.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
    return (t - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)


def loan_plain(x, cond, wg, bg, wb, bb, stats=None, training=True, norm=True):
    """models/CNN.py::LOAN.forward: BN3d(x), ReLU(BN2d(cond)) → two convs, x̂·(1 + γ) + β broadcast along D."""
    stats = stats or {}
    normalized = bn_plain(x, stats.get("rm"), stats.get("rv"), training) if norm else x
    actv = torch.relu(bn_plain(cond, stats.get("crm"), stats.get("crv"), training))
    gamma = TF.conv2d(actv, wg, bg, padding=wg.shape[-1] // 2)
    beta = TF.conv2d(actv, wb, bb, padding=wb.shape[-1] // 2)
    if x.dim() == 5:
        gamma, beta = gamma[:, :, None], beta[:, :, None]
    return normalized * (1 + gamma) + beta


def _module(c=4, cc=3, **kw):
    m = LOAN(c, cc, **kw).double()
    with torch.no_grad():
        for conv in (m.mlp_gamma, m.mlp_beta):
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.3)
    return m


def _weights(m):
    return m.mlp_gamma.weight, m.mlp_gamma.bias, m.mlp_beta.weight, m.mlp_beta.bias


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 4, 3, 5, 6)])
def test_matches_official_module_train_and_eval_with_running_stats(shape):
    m = _module()
    stats = {
        k: torch.zeros(n, dtype=D) if k.endswith("m") else torch.ones(n, dtype=D)
        for k, n in (("rm", 4), ("rv", 4), ("crm", 3), ("crv", 3))
    }
    for step in range(3):
        x = torch.randn(shape, dtype=D) * (step + 1) + step
        cond = torch.randn(shape[0], 3, 5, 6, dtype=D) * 2 - 1
        torch.testing.assert_close(m(x, cond), loan_plain(x, cond, *_weights(m), stats))
        torch.testing.assert_close(m.free_norm.running_mean, stats["rm"])
        torch.testing.assert_close(m.free_norm.running_var, stats["rv"])
        torch.testing.assert_close(m.free_norm_cond.running_mean, stats["crm"])
        torch.testing.assert_close(m.free_norm_cond.running_var, stats["crv"])
    assert int(m.free_norm.num_batches_tracked) == 3 and int(m.free_norm_cond.num_batches_tracked) == 3
    m.eval()
    torch.testing.assert_close(m(x, cond), loan_plain(x, cond, *_weights(m), stats, training=False))
    torch.testing.assert_close(m.free_norm.running_mean, stats["rm"])  # eval does not update


def test_free_norm_none_and_instance():
    x, cond = torch.randn(2, 4, 5, 5, dtype=D), torch.randn(2, 3, 5, 5, dtype=D)
    m = _module(free_norm="none")
    assert m.free_norm is None and not any(k.startswith("free_norm.") for k in m.state_dict())
    torch.testing.assert_close(m(x, cond), loan_plain(x, cond, *_weights(m), norm=False))
    mi = _module(free_norm="instance")
    mean = x.mean((2, 3), keepdim=True)
    xn = (x - mean) / torch.sqrt(((x - mean) ** 2).mean((2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(mi(x, cond), loan_plain(xn, cond, *_weights(mi), norm=False))


def test_init_and_official_state_dict_keys():
    torch.manual_seed(0)
    m = LOAN(32, 16)
    assert set(m.state_dict()) == {
        "free_norm.running_mean",
        "free_norm.running_var",
        "free_norm.num_batches_tracked",
        "free_norm_cond.running_mean",
        "free_norm_cond.running_var",
        "free_norm_cond.num_batches_tracked",
        "mlp_gamma.weight",
        "mlp_gamma.bias",
        "mlp_beta.weight",
        "mlp_beta.bias",
    }
    assert m.mlp_gamma.weight.shape == (32, 16, 3, 3)
    assert abs(m.mlp_gamma.weight.std().item() - 0.01) < 2e-3 and torch.all(m.mlp_beta.bias == 0)
    assert LOAN(8).cond_channels == 8


def test_state_dict_round_trip_resumes_exactly():
    m = _module()
    for _ in range(2):
        m(torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 3, 3, 3, dtype=D))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = LOAN(4, 3).double()
    m2.load_state_dict(torch.load(buf, weights_only=True))
    x, cond = torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 3, 3, 3, dtype=D)
    torch.testing.assert_close(m2(x, cond), m(x, cond))  # training step on both
    torch.testing.assert_close(m2.free_norm.running_var, m.free_norm.running_var)
    m.eval()
    m2.eval()
    torch.testing.assert_close(m2(x, cond), m(x, cond))


@pytest.mark.slow
def test_gradcheck():
    m = _module(2, 2)
    x = torch.randn(2, 2, 3, 3, dtype=D, requires_grad=True)
    cond = torch.randn(2, 2, 3, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, *w: loan(x, c, *w), (x, cond, *_weights(m)))
    w = [t.detach() for t in _weights(m)]
    for free_norm in ("instance", "none"):
        assert torch.autograd.gradcheck(lambda x, c, fn=free_norm: loan(x, c, *w, free_norm=fn), (x, cond))


def test_1d_input_is_width_one():
    m = _module()
    x, cond = torch.randn(2, 4, 5, dtype=D), torch.randn(2, 3, 5, dtype=D)
    torch.testing.assert_close(m(x, cond), loan_plain(x[..., None], cond[..., None], *_weights(m))[..., 0])


def test_errors():
    m = LOAN(4, 3)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="needs the condition map"):
        m(x)
    with pytest.raises(ValueError, match=r"cond of shape \(N, 3, \*spatial\)"):
        m(x, torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"cond of shape \(N=2, Cc, 5, 5\)"):
        m(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"cond of shape \(N=2"):
        m(x, torch.randn(3, 3, 5, 5))
    with pytest.raises(ValueError, match=r"x of shape \(N, 4, H, W\)"):
        m(torch.randn(2, 5, 5, 5), torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="free_norm must be one of"):
        LOAN(4, free_norm="layer")
    with pytest.raises(ValueError, match="odd"):
        LOAN(4, kernel_size=2)
    with pytest.raises(TypeError, match="floating-point"):
        m(x, torch.ones(2, 3, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"gamma_weight must be a \(4, 3, k, k\)"):
        loan(x, torch.randn(2, 3, 5, 5), torch.zeros(4, 2, 3, 3), None, torch.zeros(4, 3, 3, 3), None)
