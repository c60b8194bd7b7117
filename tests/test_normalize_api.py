"""The public engine ``normkit.functional.normalize`` and the per-head option of LayerNorm/RMSNorm,
checked against the formulas written out here."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
from normkit import functional as F


def _ref(x, red, w_shape_dims, center, w=None, b=None, eps=1e-5):
    """Plain statement: statistics over ``red``, affine broadcast from the dims in ``w_shape_dims``."""
    mean = x.mean(red, keepdim=True) if center else 0.0
    var = ((x - mean) ** 2).mean(red, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    shape = [x.shape[d] if d in w_shape_dims else 1 for d in range(x.dim())]
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


CASES = [
    # (input shape, reduce_dims, feature_dims, center)
    ((6, 16), -1, None, True),  # LayerNorm
    ((2, 5, 4, 8), -1, (-2, -1), False),  # per-head RMSNorm, weight per (head, dim)
    ((2, 5, 4, 8), (-2, -1), None, True),  # a norm over two trailing dims
    ((3, 6, 4, 5), (2, 3), 1, True),  # InstanceNorm with a per-channel affine
    ((3, 6, 4, 5), (0, 2, 3), 1, True),  # BatchNorm (needs a permutation into the canonical view)
    ((3, 6, 4, 5), 1, (1, 2), True),  # weight over (C, H), statistics over C: G/Cg order differs from x's
]


@pytest.mark.parametrize("backend", ["auto", "eager", "kernels"])
@pytest.mark.parametrize("shape,red,feat,center", CASES)
def test_normalize_matches_the_formula(shape, red, feat, center, backend):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    nd = len(shape)
    fdims = tuple(d % nd for d in ((red,) if isinstance(red, int) else red)) if feat is None else \
        tuple(d % nd for d in ((feat,) if isinstance(feat, int) else feat))
    wshape = [shape[d] for d in fdims]
    w, b = torch.rand(wshape, dtype=torch.float64) + 0.5, torch.randn(wshape, dtype=torch.float64)
    rdims = tuple(d % nd for d in ((red,) if isinstance(red, int) else red))
    y = F.normalize(x, red, feature_dims=feat, center=center, weight=w, bias=b, backend=backend)
    torch.testing.assert_close(y, _ref(x, rdims, fdims, center, w, b), rtol=1e-12, atol=1e-12)


def test_normalize_gradients_and_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, 5, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: F.normalize(x, -1, feature_dims=(-2, -1), weight=w), (x, w))
    keep = torch.rand(2, 3, 4, 5) > 0.3
    keep[..., 0] = True
    y = F.normalize(x.detach(), -1, mask=keep)
    k = keep.double()
    mean = (x.detach() * k).sum(-1, keepdim=True) / k.sum(-1, keepdim=True)
    var = ((x.detach() - mean) ** 2 * k).sum(-1, keepdim=True) / k.sum(-1, keepdim=True)
    torch.testing.assert_close(y, (x.detach() - mean) / torch.sqrt(var + 1e-5))


def test_normalize_errors_name_what_was_expected():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"reduce_dims must be dims of a 3-D input"):
        F.normalize(x, 3)
    with pytest.raises(ValueError, match="repeats a dim"):
        F.normalize(x, (-1, 2))
    with pytest.raises(ValueError, match=r"weight must have 12 elements \(shape \(3, 4\)"):
        F.normalize(x, -1, feature_dims=(1, 2), weight=torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        F.normalize(torch.ones(2, 3, dtype=torch.long))


def test_per_head_rmsnorm_is_configuration():
    torch.manual_seed(0)
    m = normkit.RMSNorm((4, 8), eps=1e-6, reduction_dims=1)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float32)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * m.weight
    torch.testing.assert_close(m(x), ref)
    # same keys as torch's RMSNorm over (4, 8): checkpoints move both ways
    torch.nn.RMSNorm((4, 8)).load_state_dict(m.state_dict())
    assert "reduction_dims=1" in repr(m)
    ln = normkit.LayerNorm((4, 8), reduction_dims=1, elementwise_affine=False)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (8,)))
    with pytest.raises(ValueError, match=r"reduction_dims must be an int in \[1, 2\]"):
        normkit.RMSNorm((4, 8), reduction_dims=3)
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 4, 8\)"):
        m(torch.randn(2, 8, 4))


@settings(max_examples=25, deadline=None)
@given(scales=st.lists(st.floats(0.01, 100.0), min_size=4, max_size=4))
def test_per_head_rmsnorm_is_invariant_to_scaling_each_head(scales):
    # RMSNorm's statistics are per head, so scaling one head's input by c > 0 leaves the output unchanged
    torch.manual_seed(1)
    m = normkit.RMSNorm((4, 8), eps=0.0, reduction_dims=1, dtype=torch.float64)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    c = torch.tensor(scales, dtype=torch.float64).reshape(1, 4, 1)
    torch.testing.assert_close(m(x * c), m(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "eager", "native"])
def test_scalenorm2d_matches_the_formula(backend):
    # ScaleNorm over the channels of (N, C, H, W): g · x / max(‖x‖₂ over C, eps) at every position
    torch.manual_seed(0)
    m = normkit.ScaleNorm2d(6, backend=backend).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    x.data[0, :, 0, 0] = 0.0  # a zero vector: the clamp, not a division by zero
    y = m(x)
    ref = m.scale * x / x.norm(dim=1, keepdim=True).clamp_min(1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, m.scale], g)
    want = torch.autograd.grad(ref, [x, m.scale], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 6, \*\)"):
        m(torch.randn(2, 5, 3, dtype=torch.float64))
