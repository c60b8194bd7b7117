"""scikit-learn's digits, split and standardized the one way every part of normkit uses it.

Nothing is downloaded: scikit-learn ships the UCI digits set (1797 grey 8×8 images, 10 classes) inside the wheel,
so the bench runs on air-gapped machines and in CI. It is small enough that a whole
training run takes seconds on a CPU, yet hard enough that a bad normalization shows up in
the accuracy.

The bench (:mod:`normkit.bench`), the digits-C streams (:mod:`normkit.adapt.streams`) and
Split-Digits (:mod:`normkit.continual.split_digits`) all read it from here, so they see the same
images, split and input scale; this module depends on nothing else in normkit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

#: Seed of the train/test permutation. Fixed (not the run seed) so every run, seed and
#: machine evaluates on the same test images and results are comparable.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DataSplit:
    """A classification dataset already split and standardized, as float32/int64 tensors."""

    name: str
    x_train: Tensor  # (N, C, H, W)
    y_train: Tensor  # (N,)
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])


class DigitsPixels(NamedTuple):
    """scikit-learn's digits split as the bench splits it, *before* standardization."""

    x_train: np.ndarray  # (N, 1, 8, 8) float32, pixels in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float  # of the training pixels (one scalar)
    std: float


@cache
def digits_pixels(test_fraction: float = 0.2) -> DigitsPixels:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` pixels in [0, 1], split with the fixed permutation.

    The unstandardized source of :func:`load_digits` (and of digits-C, which corrupts the test
    pixels before standardizing). Cached: the arrays are shared, do not modify them.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the bench needs scikit-learn for its built-in data: pip install 'normkit[bench]'") from e

    raw = _sk_load_digits()
    x = raw.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = raw.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return DigitsPixels(x[train], y[train], x[test], y[test], float(x[train].mean()), float(x[train].std()))


def standardize(pixels: np.ndarray, mean: float, std: float) -> Tensor:
    """``(pixels − mean)/std`` as a contiguous float32 tensor (the bench's input scale)."""
    return torch.from_numpy(np.ascontiguousarray((pixels.astype(np.float32) - mean) / std))


@cache
def load_digits(test_fraction: float = 0.2) -> DataSplit:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` images, split 80/20 with a fixed permutation.

    Pixels (0..16) are scaled to [0, 1] and then standardized with the *training* mean/std
    (one scalar each) so no test statistics leak into the inputs. Cached: every job of a
    suite shares one copy.
    """
    px = digits_pixels(test_fraction)
    return DataSplit(
        name="digits",
        x_train=standardize(px.x_train, px.mean, px.std),
        y_train=torch.from_numpy(px.y_train.copy()),
        x_test=standardize(px.x_test, px.mean, px.std),
        y_test=torch.from_numpy(px.y_test.copy()),
        num_classes=10,
    )
