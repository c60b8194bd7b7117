"""digits-C corruptions and test streams: same split as the bench, determinism, orders, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.adapt.streams import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    digits_c,
    digits_c_stream,
    digits_test_pixels,
    dirichlet_order,
    iid_order,
    make_stream,
)
from normkit.data import load_digits


def test_clean_digits_c_is_the_bench_test_split():
    data = load_digits()
    clean = digits_c("clean")
    assert torch.equal(clean.x, data.x_test) and torch.equal(clean.y, data.y_test)
    px = digits_test_pixels().pixels
    assert px.shape == (359, 1, 8, 8) and px.min() >= 0 and px.max() <= 1


def _seed_rng(seed, name, severity):
    return np.random.default_rng(np.random.SeedSequence([seed, CORRUPTIONS.index(name), severity]))


def test_corruptions_match_their_formulas():
    x = digits_test_pixels().pixels[:20]
    c = SEVERITIES["contrast"][4]
    m = x.mean(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(corrupt(x, "contrast", 5), np.clip((x - m) * c + m, 0, 1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(corrupt(x, "brightness", 3), np.clip(x + 0.3, 0, 1), rtol=1e-6)
    noise = _seed_rng(7, "gaussian_noise", 2).normal(size=x.shape, scale=0.12)
    np.testing.assert_allclose(corrupt(x, "gaussian_noise", 2, seed=7), np.clip(x + noise, 0, 1), rtol=1e-6, atol=1e-7)
    # pixelate at severity 5: 3×3 pixels blown up by nearest -> at most 9 distinct values, rows/columns repeat
    pix = corrupt(x, "pixelate", 5)
    assert max(len(np.unique(img)) for img in pix) <= 9
    assert all(len({tuple(r) for r in img[0]}) <= 3 for img in pix)
    blurred = corrupt(x, "gaussian_blur", 5)
    np.testing.assert_allclose(blurred.sum(axis=(-2, -1)), x.sum(axis=(-2, -1)), rtol=0.2)  # mass roughly kept
    assert blurred.std() < x.std()
    imp = corrupt(x, "impulse_noise", 5)
    changed = imp != x
    assert 0.05 < changed.mean() < 0.3 and set(np.unique(imp[changed])) <= {0.0, 1.0}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_is_in_range_deterministic_and_grows_with_severity(name):
    x = digits_test_pixels().pixels[:60]
    dist = []
    for sev in range(1, 6):
        y = corrupt(x, name, sev, seed=3)
        assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
        assert np.array_equal(y, corrupt(x, name, sev, seed=3))
        dist.append(np.abs(y - x).mean())
    assert all(b >= a - 1e-6 for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] > 0.01


def test_seed_and_draw_change_only_random_corruptions():
    x = digits_test_pixels().pixels[:10]
    assert not np.array_equal(corrupt(x, "shot_noise", 5, seed=0), corrupt(x, "shot_noise", 5, seed=1))
    assert not np.array_equal(corrupt(x, "shot_noise", 5, draw=0), corrupt(x, "shot_noise", 5, draw=1))
    assert np.array_equal(corrupt(x, "contrast", 5, seed=0), corrupt(x, "contrast", 5, seed=1))


def test_iid_and_dirichlet_orders():
    y = load_digits().y_test.numpy()
    for order in (iid_order(len(y), seed=0), dirichlet_order(y, 0.1, seed=0)):
        assert sorted(order.tolist()) == list(range(len(y)))
    assert np.array_equal(dirichlet_order(y, 0.1, seed=4), dirichlet_order(y, 0.1, seed=4))
    assert not np.array_equal(dirichlet_order(y, 0.1, seed=4), dirichlet_order(y, 0.1, seed=5))

    def same_neighbour(order):
        lab = y[order]
        return float((lab[1:] == lab[:-1]).mean())

    iid = same_neighbour(iid_order(len(y), seed=0))
    corr = [np.mean([same_neighbour(dirichlet_order(y, d, seed=s)) for s in range(5)]) for d in (0.01, 0.1, 10.0)]
    assert iid < 0.2  # ≈ 1/10 for shuffled labels
    assert corr[0] > corr[2] and corr[1] > 0.5 and corr[1] > 3 * iid


def test_dirichlet_errors_and_short_streams():
    with pytest.raises(ValueError, match="delta must be > 0"):
        dirichlet_order([0, 1, 2], 0.0)
    labels = np.repeat(np.arange(10), 4)  # 40 samples: the reference's 10 per chunk is impossible
    assert sorted(dirichlet_order(labels, 0.1).tolist()) == list(range(40))


def test_domain_streams_batch_and_reset_points():
    s = digits_c_stream(["gaussian_noise", "contrast"], severity=5, batch_size=64, order="dirichlet", seed=1)
    assert s.domains == ("gaussian_noise", "contrast") and s.num_samples == 2 * 359
    assert [len(b.y) for b in s][:7] == [64, 64, 64, 64, 64, 39, 64]  # batches never cross a domain
    assert [b.domain for b in s][5:7] == ["gaussian_noise", "contrast"]
    ref = digits_c("contrast", 5, seed=1)
    got = torch.cat([b.y for b in s if b.domain == "contrast"])
    assert sorted(got.tolist()) == sorted(ref.y.tolist())


def test_mixed_limit_and_passes():
    s = digits_c_stream(["shot_noise", "brightness", "pixelate"], batch_size=16, mixed=True, limit=20, seed=0)
    assert s.mixed and {b.domain for b in s} == {"mixed"} and s.num_samples == 60
    x = torch.cat([b.x for b in s])
    # pooled: the brightened images (standardized mean far above 0) are spread over the stream
    bright = x.mean((1, 2, 3)) > 0.8
    assert bright[:30].any() and bright[30:].any()
    p = digits_c_stream(["shot_noise"], batch_size=64, passes=3, limit=10)
    assert p.num_samples == 30 and p.passes == 3
    xs = torch.cat([b.x for b in p])
    assert len({tuple(v.flatten().tolist()) for v in xs}) == 30  # fresh noise per pass


def test_stream_errors():
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        digits_c_stream(["fog"])
    with pytest.raises(ValueError, match="severity must be an int in 1..5"):
        digits_c_stream(severity=6)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        digits_c_stream(batch_size=0)
    with pytest.raises(ValueError, match="unknown stream order 'sorted'"):
        digits_c_stream(order="sorted")
    with pytest.raises(ValueError, match="same length"):
        make_stream(torch.zeros(3, 1), torch.zeros(2), 2)


@settings(max_examples=25, deadline=None)
@given(bs=st.integers(1, 64), order=st.sampled_from(["iid", "dirichlet"]), seed=st.integers(0, 50))
def test_every_sample_appears_once_at_any_batch_size(bs, order, seed):
    x = torch.arange(120, dtype=torch.float32).reshape(120, 1)
    y = torch.arange(120) % 10
    batches = make_stream(x, y, bs, order=order, seed=seed)
    assert all(1 <= len(b.y) <= bs for b in batches) and all(len(b.y) == bs for b in batches[:-1])
    xs = torch.cat([b.x for b in batches]).flatten().long()
    assert sorted(xs.tolist()) == list(range(120))
    assert torch.equal(torch.cat([b.y for b in batches]), xs % 10)
