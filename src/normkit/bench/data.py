"""Built-in datasets for the bench: nothing is downloaded.

scikit-learn ships the UCI digits set (1797 grey 8×8 images, 10 classes) inside the wheel,
so the bench runs on air-gapped machines and in CI. It is small enough that a whole
training run takes seconds on a CPU, yet hard enough that a bad normalization shows up in
the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

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


@cache
def load_digits(test_fraction: float = 0.2) -> DataSplit:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` images, split 80/20 with a fixed permutation.

    Pixels (0..16) are scaled to [0, 1] and then standardized with the *training* mean/std
    (one scalar each) so no test statistics leak into the inputs. Cached: every job of a
    suite shares one copy.
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
    mean, std = float(x[train].mean()), float(x[train].std())
    x = (x - mean) / std
    return DataSplit(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x[train])),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test])),
        y_test=torch.from_numpy(y[test]),
        num_classes=10,
    )
