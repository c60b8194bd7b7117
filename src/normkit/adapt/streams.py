"""Shifted test streams from built-in data: digits-C (scikit-learn digits under corruptions).

``digits_c(corruption, severity)`` is the digits *test* split of :func:`normkit.data.load_digits`
(same images, same standardization with the *training* mean/std) with a corruption applied to the
pixels in [0, 1] before standardizing, in the spirit of CIFAR-10-C / ImageNet-C (Hendrycks &
Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
arXiv:1903.12261). Severity parameters (:data:`SEVERITIES`) follow CIFAR-10-C where its pixel-scale
values transfer to an 8×8 grey digit, ImageNet-C's where CIFAR's barely touch a mostly-black 8×8
image (shot/impulse/speckle noise, brightness), and are our own for the spatial corruptions (blur
σ and pixelation sizes in pixels of the 8×8 image). Everything is deterministic given ``seed``.

Streams (:func:`digits_c_stream`) cut the sets into batches of any size (1–64 in the bench) in one of
two orders:

* ``"iid"`` — a seeded shuffle;
* ``"dirichlet"`` — label-correlated, as the non-i.i.d. protocol of UnMix-TNS / NOTE / RoTTA
  (``sort_by_dirichlet`` in devavratTomar/unmixtns, from NOTE): the samples of each class are split
  over ``num_classes`` chunks with Dirichlet(δ) proportions, and the stream visits chunk after chunk,
  class after class inside a chunk. Small δ (0.1 for CIFAR10-C, 0.01 for ImageNet-C there) gives long
  single-class runs.

Domains come one after another (``mixed=False``; batches never cross a domain boundary, each batch
carries its domain name so an evaluation can reset between domains), or all corruptions are pooled
into one mixed-domain stream (``mixed=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from normkit.data import digits_pixels, standardize

# --------------------------------------------------------------------------- corruptions

#: corruption → its parameter at severities 1..5 (see the module docstring for where they come from)
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # σ of additive noise (CIFAR-10-C)
    "shot_noise": (60, 25, 12, 5, 3),  # Poisson rate scale (ImageNet-C)
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # salt-and-pepper fraction (ImageNet-C)
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),  # σ of multiplicative noise (ImageNet-C)
    "gaussian_blur": (0.4, 0.5, 0.6, 0.7, 0.8),  # σ in pixels of the 8×8 image (ours)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the image mean (CIFAR-10-C)
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to the grey level (ImageNet-C's V shift)
    "pixelate": (7, 6, 5, 4, 3),  # down to c×c pixels (antialiased), back up to 8×8 by nearest (ours)
}
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITIES)
ORDERS = ("iid", "dirichlet")


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1)


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    radius = max(1, int(4.0 * sigma + 0.5))  # scipy.ndimage's truncate=4
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    out = x.astype(np.float64)
    for axis in (-2, -1):  # separable, edge ("nearest") padding
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return np.clip(out, 0, 1)


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(-2, -1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + c, 0, 1)


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # Antialiased (not adaptive-average) downsampling: at 8 px, averaging windows of non-divisor sizes
    # alias so badly that 5×5 ends up farther from the image than 4×4; this order is monotone.
    h, w = x.shape[-2:]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, h, w)
    small = torch.nn.functional.interpolate(t, size=(int(c), int(c)), mode="bilinear", antialias=True, align_corners=False)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="nearest")
    return np.clip(big.reshape(x.shape).numpy(), 0, 1).astype(x.dtype)


_CORRUPT: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
}


def _check_corruption(corruption: str) -> None:
    if corruption not in SEVERITIES and corruption != "clean":
        raise ValueError(f"unknown corruption {corruption!r}; valid: clean, {', '.join(CORRUPTIONS)}")


def _check_severity(severity: int) -> None:
    if not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def corrupt(images: np.ndarray, corruption: str, severity: int, *, seed: int = 0, draw: int = 0) -> np.ndarray:
    """Apply ``corruption`` at ``severity`` (1..5) to images with pixels in [0, 1] (any leading shape, H×W last).

    Returns float32 in [0, 1]. Deterministic given ``seed`` and ``draw`` (the generator is seeded with
    ``(seed, corruption index, severity[, draw])``, so each corruption draws its own noise; ``draw``
    gives independent noise for repeated passes over the same images).
    """
    _check_corruption(corruption)
    _check_severity(severity)
    x = np.asarray(images, dtype=np.float32)
    if corruption == "clean":
        return x.copy()
    key = [seed, CORRUPTIONS.index(corruption), severity] + ([draw] if draw else [])
    rng = np.random.default_rng(np.random.SeedSequence(key))
    return _CORRUPT[corruption](x, SEVERITIES[corruption][severity - 1], rng).astype(np.float32)


# --------------------------------------------------------------------------- digits-C


@dataclass(frozen=True)
class DigitsPixels:
    """The digits test split as pixels in [0, 1] plus the training mean/std used to standardize."""

    pixels: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    mean: float
    std: float

    def standardize(self, pixels: np.ndarray) -> Tensor:
        """Pixels → the model's input scale, exactly as :func:`normkit.data.load_digits`."""
        return standardize(pixels, self.mean, self.std)


@cache
def digits_test_pixels(test_fraction: float = 0.2) -> DigitsPixels:
    """The test images of :func:`normkit.data.load_digits` before standardization (same split).

    Both come from :func:`normkit.data.digits_pixels`, so standardizing these pixels gives
    ``load_digits().x_test`` exactly.
    """
    px = digits_pixels(test_fraction)
    return DigitsPixels(px.x_test, px.y_test, px.mean, px.std)


class ShiftedSet(NamedTuple):
    """One domain: standardized images ``x`` (N, 1, 8, 8), labels ``y`` (N,), its name and severity."""

    x: Tensor
    y: Tensor
    corruption: str
    severity: int


@cache
def digits_c(corruption: str, severity: int = 5, *, seed: int = 0, draw: int = 0) -> ShiftedSet:
    """The digits test split under ``corruption`` at ``severity`` (``"clean"`` for none), standardized.

    ``draw`` selects an independent noise draw (see :func:`corrupt`). Cached (returned tensors are
    shared: do not modify them in place).
    """
    base = digits_test_pixels()
    pixels = corrupt(base.pixels, corruption, severity, seed=seed, draw=draw)
    return ShiftedSet(base.standardize(pixels), torch.from_numpy(base.labels.copy()), corruption, severity)


# --------------------------------------------------------------------------- orders


def iid_order(n: int, *, seed: int = 0) -> np.ndarray:
    """A seeded random permutation of ``range(n)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, 101])).permutation(n)


def dirichlet_order(
    labels: Sequence[int] | np.ndarray | Tensor,
    delta: float = 0.1,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    min_chunk: int | None = None,
    max_tries: int = 1000,
) -> np.ndarray:
    """Label-correlated order of the indices of ``labels`` (UnMix-TNS's / NOTE's ``sort_by_dirichlet``).

    For each class k: shuffle its indices, draw proportions ``p ~ Dirichlet(δ·1)`` over ``num_classes``
    chunks, zero the proportions of chunks already holding ≥ N/num_classes samples, renormalize and
    split the class's indices by the cumulative proportions. Retry until every chunk has at least
    ``min_chunk`` samples. The order then visits the chunks in turn and, inside a chunk, its classes in
    a random order. As the reference, except: a seeded generator instead of the global one, a retry
    budget instead of a 120 s timer, and ``min_chunk`` defaults to ``min(10, N // (2·num_classes))`` —
    the reference's 10, lowered for streams too short for it.
    """
    if not delta > 0:
        raise ValueError(f"the Dirichlet concentration delta must be > 0, got {delta!r}")
    lab = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64).reshape(-1)
    n = len(lab)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = int(lab.max()) + 1 if num_classes is None else num_classes
    chunks = k
    threshold = min(10, n // (2 * chunks)) if min_chunk is None else min_chunk
    rng = np.random.default_rng(np.random.SeedSequence([seed, 202]))
    for _ in range(max_tries):
        idx_batch: list[list[int]] = [[] for _ in range(chunks)]
        idx_batch_cls: list[list[np.ndarray]] = [[] for _ in range(chunks)]
        ok = True
        for c in range(k):
            idx_c = np.flatnonzero(lab == c)
            rng.shuffle(idx_c)
            p = rng.dirichlet(np.repeat(delta, chunks))
            p = np.array([pj * (len(ib) < n / chunks) for pj, ib in zip(p, idx_batch)])
            if not p.sum() > 0:
                ok = False
                break
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_c)).astype(int)[:-1]
            parts = np.split(idx_c, cuts)
            idx_batch = [ib + part.tolist() for ib, part in zip(idx_batch, parts)]
            for ic, part in zip(idx_batch_cls, parts):
                ic.append(part)
        if ok and min(len(ib) for ib in idx_batch) >= threshold:
            break
    else:
        raise ValueError(f"could not build a label-correlated order with delta={delta} for {n} samples; try another delta")
    order: list[int] = []
    for chunk in idx_batch_cls:
        for c in rng.permutation(k):
            order.extend(chunk[c].tolist())
    return np.asarray(order, dtype=np.int64)


def order_indices(labels: Tensor | np.ndarray, order: str, *, delta: float = 0.1, seed: int = 0) -> np.ndarray:
    """``"iid"`` → :func:`iid_order`, ``"dirichlet"`` → :func:`dirichlet_order`."""
    if order == "iid":
        return iid_order(len(labels), seed=seed)
    if order == "dirichlet":
        return dirichlet_order(labels, delta, seed=seed)
    raise ValueError(f"unknown stream order {order!r}; valid orders: {', '.join(ORDERS)}")


# --------------------------------------------------------------------------- streams


class StreamBatch(NamedTuple):
    """One test batch: inputs, labels (for scoring only) and the domain it comes from (``"mixed"`` if pooled)."""

    x: Tensor
    y: Tensor
    domain: str


@dataclass(frozen=True)
class Stream:
    """A materialized test stream: iterate for :class:`StreamBatch` es."""

    batches: tuple[StreamBatch, ...]
    batch_size: int
    order: str
    domains: tuple[str, ...]
    severity: int
    mixed: bool = False
    delta: float | None = None
    passes: int = 1

    def __iter__(self) -> Iterator[StreamBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(len(b.y) for b in self.batches)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def make_stream(
    x: Tensor, y: Tensor, batch_size: int, *, order: str = "iid", delta: float = 0.1, seed: int = 0, domain: str = ""
) -> list[StreamBatch]:
    """Order ``(x, y)`` (``"iid"`` or ``"dirichlet"``) and cut it into batches (the last one may be short)."""
    _check_batch_size(batch_size)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    idx = torch.from_numpy(order_indices(y, order, delta=delta, seed=seed))
    xs, ys = x[idx], y[idx]
    return [StreamBatch(xs[i : i + batch_size], ys[i : i + batch_size], domain) for i in range(0, len(idx), batch_size)]


def digits_c_stream(
    corruptions: Sequence[str] | None = None,
    severity: int = 5,
    batch_size: int = 64,
    *,
    order: str = "iid",
    delta: float = 0.1,
    mixed: bool = False,
    seed: int = 0,
    limit: int | None = None,
    passes: int = 1,
) -> Stream:
    """A digits-C test stream over ``corruptions`` (default: all of :data:`CORRUPTIONS`) at ``severity``.

    ``order``: ``"iid"`` or ``"dirichlet"`` (label-correlated with concentration ``delta``).
    ``mixed=False``: the domains one after another, each ordered on its own, batches never crossing a
    domain; ``mixed=True``: all domains pooled and ordered together (mixed-domain shift). ``limit``
    keeps a seeded random subset of that many images per domain (for quick runs). ``passes`` repeats
    each domain's images that many times (a fresh noise draw per pass for the random corruptions)
    before ordering, for streams as long as CIFAR-10-C's 10,000-image domains need: with 359 images a
    domain ends before stateful methods (EMA statistics, UnMix-TNS components) have moved, and
    label-correlated chunks (≈ N / num_classes samples) are shorter than a batch of 64. Repeated images
    make such a stream less diverse than a real domain of that length. Deterministic given ``seed``
    (corruption noise, subset and order).
    """
    names = tuple(CORRUPTIONS if corruptions is None else corruptions)
    if not names:
        raise ValueError("digits_c_stream needs at least one corruption")
    for c in names:
        _check_corruption(c)
    _check_severity(severity)
    _check_batch_size(batch_size)
    if order not in ORDERS:
        raise ValueError(f"unknown stream order {order!r}; valid orders: {', '.join(ORDERS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    sets = []
    for i, name in enumerate(names):
        draws = [digits_c(name, severity, seed=seed, draw=p) for p in range(passes)]
        keep = None
        if limit is not None and limit < len(draws[0].y):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 303, i]))
            keep = torch.from_numpy(rng.permutation(len(draws[0].y))[:limit])
        x = torch.cat([d.x if keep is None else d.x[keep] for d in draws])
        y = torch.cat([d.y if keep is None else d.y[keep] for d in draws])
        sets.append(ShiftedSet(x, y, name, severity))
    if mixed:
        x = torch.cat([s.x for s in sets])
        y = torch.cat([s.y for s in sets])
        batches = make_stream(x, y, batch_size, order=order, delta=delta, seed=seed, domain="mixed")
    else:
        batches = []
        for i, s in enumerate(sets):
            batches += make_stream(s.x, s.y, batch_size, order=order, delta=delta, seed=seed * 1000 + i, domain=s.corruption)
    return Stream(tuple(batches), batch_size, order, names, severity, mixed, delta if order == "dirichlet" else None, passes)
