"""Hypothesis properties: invariances, shapes, masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit import functional as F

settings.register_profile("normkit", max_examples=30, deadline=None)
settings.load_profile("normkit")

shapes = st.tuples(st.integers(1, 5), st.integers(2, 9))
seeds = st.integers(0, 2**16)


def _x(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(shapes, seeds, st.floats(1e-2, 1e3))
def test_layer_and_rms_norm_are_scale_invariant(shape, seed, a):
    x = _x(shape, seed) + 0.1
    torch.testing.assert_close(F.layer_norm(a * x, shape[-1], eps=0.0), F.layer_norm(x, shape[-1], eps=0.0))
    torch.testing.assert_close(F.rms_norm(a * x, shape[-1], eps=0.0), F.rms_norm(x, shape[-1], eps=0.0))


@given(shapes, seeds, st.floats(-100, 100))
def test_layer_norm_is_shift_invariant(shape, seed, c):
    x = _x(shape, seed)
    torch.testing.assert_close(F.layer_norm(x + c, shape[-1]), F.layer_norm(x, shape[-1]), rtol=1e-6, atol=1e-6)


@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), st.integers(1, 3), seeds)
def test_shapes_are_preserved(lead, groups, seed):
    c = 2 * groups
    xt = _x((*lead, c), seed)
    assert F.layer_norm(xt, c).shape == xt.shape
    assert F.rms_norm(xt, c).shape == xt.shape
    xi = _x((2, c, *lead), seed)
    assert F.group_norm(xi, groups).shape == xi.shape
    assert F.batch_norm(xi, None, None, training=True).shape == xi.shape
    assert F.layer_norm2d(xi).shape == xi.shape


@given(st.integers(2, 5), st.integers(1, 4), st.integers(3, 8), seeds)
def test_batch_norm_mask_equals_dropping_masked_positions(n, c, length, seed):
    x = _x((n, c, length), seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(n, 1, length, generator=g) < 0.7
    mask[0, 0, :2] = True
    y = F.batch_norm(x, None, None, training=True, mask=mask)
    kept = x.permute(0, 2, 1)[mask[:, 0, :]]  # (kept positions, C)
    y_dropped = F.batch_norm(kept, None, None, training=True)
    torch.testing.assert_close(y.permute(0, 2, 1)[mask[:, 0, :]], y_dropped)


@given(shapes, seeds)
def test_layer_norm_feature_mask_equals_dropping(shape, seed):
    x = _x(shape, seed)
    mask = torch.zeros(shape[-1], dtype=torch.bool)
    mask[: max(1, shape[-1] // 2 + 1)] = True
    y = F.layer_norm(x, shape[-1], mask=mask)
    k = int(mask.sum())
    torch.testing.assert_close(y[..., mask], F.layer_norm(x[..., mask], k))
