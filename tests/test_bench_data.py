"""The bench's generated data: deterministic per seed, never on the network, faithful to its source."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from normkit.data.mnist1d import make_mnist1d, templates
from normkit.data.scenes import SHAPES, _inside, make_scenes


@pytest.fixture
def no_network(monkeypatch):
    """Any socket creation or connection raises: generators must not touch the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access during data generation")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_mnist1d_is_deterministic_per_seed_and_offline(no_network):
    a, ya = make_mnist1d(seed=3, num_samples=200)
    b, yb = make_mnist1d(seed=3, num_samples=200)
    c, _ = make_mnist1d(seed=4, num_samples=200)
    assert a.shape == (200, 40) and np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    assert np.bincount(ya).tolist() == [20] * 10
    assert abs(a.mean()) < 1e-9 and a.std() == pytest.approx(1.0)  # standardized as the official set


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    make_mnist1d(seed=0, num_samples=20)
    assert np.array_equal(np.random.get_state()[1], before)


def test_mnist1d_templates_follow_the_paper():
    t = templates()
    assert t.shape == (10, 12)
    # whitened then shifted to start at 0 and divided by 6: every template starts at 0 and has std 1/6
    assert np.allclose(t[:, 0], 0.0) and np.allclose(t.std(axis=1), 1 / 6)
    # digit 0's template, written out from the paper's figure data: 5,6,6.5,6.75,7,7,7,7,6.75,6.5,6,5
    d0 = np.array([5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5.0])
    d0 = (d0 - d0.mean()) / d0.std()
    assert np.allclose(t[0], (d0 - d0[0]) / 6)


def test_mnist1d_equals_the_official_generator_where_installed(no_network):
    md = pytest.importorskip("mnist1d.data")
    ours, y = make_mnist1d(seed=5, num_samples=300)
    args = md.get_dataset_args()
    args.num_samples, args.seed = 300, 5
    state = np.random.get_state()
    try:
        official = md.make_dataset(args)  # seeds numpy's global generator: restored below
    finally:
        np.random.set_state(state)
    assert np.array_equal(ours[:240], official["x"]) and np.array_equal(ours[240:], official["x_test"])
    assert np.array_equal(y[:240], official["y"])


def test_scenes_are_deterministic_balanced_and_offline(no_network):
    a, ya = make_scenes(50, seed=1)
    b, yb = make_scenes(50, seed=1)
    c, _ = make_scenes(50, seed=2)
    assert a.shape == (50, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    assert np.bincount(ya, minlength=10).tolist() == [5] * 10


def test_scene_shapes_are_the_named_shapes():
    """Each class's mask at the origin-centred unit grid, checked at a few points by the plain geometry."""
    u, v = np.array([0.0, 0.7, 0.0, 0.9, 0.0]), np.array([0.0, 0.0, 0.7, 0.9, -0.8])
    inside = {name: _inside(c, u, v).tolist() for c, name in enumerate(SHAPES)}
    assert inside["disk"] == [True, True, True, False, True]  # r = 0, .7, .7, 1.27, .8
    assert inside["ring"] == [False, True, True, False, True]  # hole below r = .55
    assert inside["square"] == [True, True, True, False, False]  # max(|u|, |v|) < .8
    assert inside["plus"] == [True, True, True, False, True]  # arms of half-width .28
    assert inside["half-disk"] == [True, True, True, False, False]  # upper half only
    assert inside["two-dots"] == [False, True, False, False, False]  # dots at u = ±.55


def test_bench_loaders_split_and_standardize():
    from normkit.data.mnist1d import load_mnist1d
    from normkit.data.scenes import load_scenes

    m = load_mnist1d()
    assert m.x_train.shape == (4000, 1, 40) and m.x_test.shape == (1000, 1, 40) and m.num_classes == 10
    s = load_scenes(200, 50)
    assert s.x_train.shape == (200, 3, 32, 32) and s.x_test.shape == (50, 3, 32, 32)
    torch.testing.assert_close(s.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)


def test_unigram_entropy_of_the_text_corpus():
    """The LM's "learned nothing" level: −Σ p log p over the training split's byte frequencies, written out."""
    import math
    from collections import Counter

    from normkit.data.text import load_text

    corpus = load_text()
    counts = Counter(corpus.train.tolist())
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert corpus.unigram_nats() == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.log(256)
