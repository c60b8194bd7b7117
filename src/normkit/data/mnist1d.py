"""MNIST-1D, generated locally: 10 classes of 1-D signals of 40 positions (4000 train, 1000 test).

Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D" (ICML 2024, arXiv:2011.14439). Each
sample is one of ten hand-drawn 12-point templates passed through the paper's transformations, in
this order (``mnist1d.transform.transform`` of the official package, defaults of its
``get_dataset_args``)::

    x ← pad(template + ε, U{36..60} zeros)      # random-length zero tail
    x ← interp(x, 12 + 60 = 72 points)          # dilate to a common length
    x ← x · (1 + 0.4 (U − ½))                   # scale
    x ← roll(x, k),  k ~ U{0..47}               # translate
    x ← where(x ≠ 0, x, gaussian_filter(0.25 N, σ=2))   # correlated noise where the signal is 0
    x ← x + 0.02 N                              # i.i.d. noise
    x ← x − 0.75 (U − ½) · linspace(−½, ½, 72)  # shear
    x ← interp(x, 40 points)                    # subsample

then the set is shuffled, standardized with its global mean and std, and split 80/20. A linear
classifier reaches ~32%, an MLP ~68%, a CNN ~94% in the paper: unlike 8×8 digits, architecture
and normalization choices show. Our generator draws its random numbers in exactly the official
order from a local ``numpy.random.RandomState(seed)`` (the package seeds numpy's global generator
instead), so ``seed=42`` gives the official arrays bit for bit, without touching global state and
without the package (which also carries a download path, never used here). Needs scipy (a
dependency of scikit-learn, the bench extra) for the Gaussian filter.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from normkit.data.digits import DataSplit

#: The official defaults (``mnist1d.data.get_dataset_args``); the URL is deliberately absent.
MNIST1D_ARGS: dict[str, object] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": (36, 60),
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "final_seq_length": 40,
}
#: The official data set's seed.
MNIST1D_SEED = 42
SEQ_LEN = 40


def templates() -> np.ndarray:
    """The ten 12-point digit templates, whitened, starting at 0, divided by 6 (as the official ``get_templates``)."""
    d = np.asarray(
        [
            [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
            [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
            [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
            [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
            [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
            [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
            [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
            [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
        ]
    )
    d = d - d.mean(1, keepdims=True)
    d = d / d.std(1, keepdims=True)
    d = d - d[:, :1]
    return d / 6.0


def _interp(x: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of ``x`` onto ``n`` evenly spaced points of the same [0, 1] range."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _transform(x: np.ndarray, rng: np.random.RandomState, eps: float = 1e-8) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    a = MNIST1D_ARGS
    low, high = a["padding"]  # type: ignore[misc]
    p = low + int(rng.rand() * (high - low + 1))
    x = np.concatenate([x + eps, np.zeros(p)])
    x = _interp(x, int(a["template_len"]) + high)  # type: ignore[call-overload]
    x = x * (1 + float(a["scale_coeff"]) * (rng.rand() - 0.5))  # type: ignore[arg-type]
    k = rng.choice(int(a["max_translation"]))  # type: ignore[call-overload]
    x = np.concatenate([x[-k:], x[:-k]])  # k = 0 keeps x, as the official code
    mask = x != 0
    x = mask * x + (1 - mask) * gaussian_filter(float(a["corr_noise_scale"]) * rng.randn(*x.shape), 2)  # type: ignore[arg-type]
    x = x + float(a["iid_noise_scale"]) * rng.randn(*x.shape)  # type: ignore[arg-type]
    coeff = float(a["shear_scale"]) * (rng.rand() - 0.5)  # type: ignore[arg-type]
    x = x - coeff * np.linspace(-0.5, 0.5, len(x))
    return _interp(x, int(a["final_seq_length"]))  # type: ignore[call-overload]


def make_mnist1d(seed: int = MNIST1D_SEED, num_samples: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``num_samples`` signals ``(N, 40)`` float64 (shuffled, standardized) and labels ``(N,)``.

    Deterministic per ``seed``; ``seed=42`` with the default size reproduces the official data set.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"num_samples must be an int >= 10 (one per class), got {num_samples!r}")
    rng = np.random.RandomState(seed)
    t = templates()
    per_class = num_samples // len(t)
    xs = [_transform(t[label], rng) for label in range(len(t)) for _ in range(per_class)]
    ys = [label for label in range(len(t)) for _ in range(per_class)]
    order = rng.permutation(len(ys))
    x, y = np.stack(xs)[order], np.asarray(ys, dtype=np.int64)[order]
    return (x - x.mean()) / x.std(), y


@cache
def load_mnist1d(seed: int = MNIST1D_SEED) -> DataSplit:
    """MNIST-1D as a :class:`DataSplit` of ``(N, 1, 40)`` float32 signals, the official 80/20 split.

    The channel axis makes the signals a 1-D image (``Conv1d`` input); sequence models read the 40
    positions as tokens. Cached per seed; generating takes about a second.
    """
    x, y = make_mnist1d(seed)
    split = int(len(y) * float(MNIST1D_ARGS["train_split"]))  # type: ignore[arg-type]
    xt = torch.from_numpy(x.astype(np.float32)).unsqueeze(1)
    yt = torch.from_numpy(y)
    return DataSplit("mnist1d", xt[:split].contiguous(), yt[:split].clone(), xt[split:].contiguous(), yt[split:].clone(), 10)
