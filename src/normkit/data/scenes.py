"""Scenes: procedurally generated 32×32 RGB images of ten shapes under varied colour, light and clutter.

Why this task: 8×8 digits is too easy for normalization to matter (every norm reaches ~98%, and BN
at batch 2 loses nothing). Natural photographs differ from image to image in colour, brightness,
contrast and background texture; those *per-image* differences are what make a batch of two a poor
estimate of the population statistics BatchNorm uses at test time, and what per-sample norms remove.
Scenes reproduces them with nothing downloaded and at a size a 2-core CPU trains in seconds:

* **object** (the label): one of ten shapes (:data:`SHAPES`) of random size (radius 6–11 px),
  position and rotation (±20°, small enough that no two classes become the same shape);
* **colours**: a random background colour; the object's colour differs from it by a random RGB
  offset of length 0.5–1 (darker or brighter, any hue), so the object is always visible;
* **illumination**: a per-image gain (×0.6–1.4) and offset (±0.2), and a linear light gradient in a
  random direction;
* **texture**: a random sum of three oriented sinusoids over the background;
* **clutter**: one to three small distractor blobs (disks or squares, radius 1–2.5 px) of random colour;
* **noise**: i.i.d. Gaussian pixel noise (σ = 0.06).

Pixels are standardized per channel with the training set's mean and std. Deterministic per seed
(one ``numpy.random.Generator``); train and test are drawn from the same generator, so the test set
is the same for every run that uses the same data seed. Images are vectorized over the whole set
(about a second for 6000 images).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from normkit.data.digits import DataSplit

#: The ten classes, in label order.
SHAPES = ("disk", "ring", "square", "frame", "triangle", "plus", "half-disk", "bar", "two-dots", "crescent")
IMAGE_SIZE = 32
#: Data seed of the built-in split (fixed, like digits' split seed, so every run sees the same images).
SCENES_SEED = 0


def _inside(c: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-the-shape mask of class ``c`` from local coordinates ``(u, v)`` in units of the radius (v up)."""
    r = np.sqrt(u * u + v * v)
    a, b = np.abs(u), np.abs(v)
    if c == 0:  # disk
        return r < 1.0
    if c == 1:  # ring
        return (r < 1.0) & (r > 0.55)
    if c == 2:  # square
        return np.maximum(a, b) < 0.8
    if c == 3:  # frame
        return (np.maximum(a, b) < 0.85) & (np.maximum(a, b) > 0.5)
    if c == 4:  # triangle, apex up
        return (v > -0.55) & (v < 0.9 - np.sqrt(3.0) * a)
    if c == 5:  # plus
        return ((a < 0.28) & (b < 0.95)) | ((b < 0.28) & (a < 0.95))
    if c == 6:  # half-disk
        return (r < 1.0) & (v > -0.1)
    if c == 7:  # bar
        return u**2 + (v / 0.32) ** 2 < 1.0
    if c == 8:  # two dots
        return ((u - 0.55) ** 2 + v**2 < 0.16) | ((u + 0.55) ** 2 + v**2 < 0.16)
    return (r < 1.0) & ((u - 0.45) ** 2 + (v - 0.1) ** 2 > 0.6)  # crescent


def _shape_mask(label: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Each image's object mask ``(N, H, W)``: its class's shape at its local coordinates."""
    out = np.zeros(u.shape, dtype=bool)
    for c in range(len(SHAPES)):
        idx = label == c
        out[idx] = _inside(c, u[idx], v[idx])
    return out


def make_scenes(n: int, seed: int = SCENES_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``n`` images ``(n, 3, 32, 32)`` float32 in roughly [0, 1] (unstandardized) and labels ``(n,)``.

    Classes are balanced (``n // 10`` each, the remainder from the first classes) and shuffled.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    s = IMAGE_SIZE
    y = rng.permutation(np.arange(n) % len(SHAPES)).astype(np.int64)
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float32) + 0.5, np.arange(s, dtype=np.float32) + 0.5, indexing="ij")
    yy, xx = yy[None], xx[None]  # (1, H, W)

    def col(k: int) -> np.ndarray:
        return rng.uniform(0.0, 1.0, (n, 3, 1, 1)).astype(np.float32) if k == 3 else rng.uniform(0, 1, (n, k))

    # background: colour, texture, light gradient
    bg = col(3)
    tex = np.zeros((n, 1, s, s), np.float32)
    for _ in range(3):
        theta = rng.uniform(0, np.pi, (n, 1, 1))
        freq = rng.uniform(0.15, 0.9, (n, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        amp = rng.uniform(0.0, 0.12, (n, 1, 1))
        tex[:, 0] += (amp * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)).astype(np.float32)
    img = bg + tex
    # object
    radius = rng.uniform(6.0, 11.0, (n, 1, 1)).astype(np.float32)
    cy = rng.uniform(radius[:, 0, 0] * 0.7, s - radius[:, 0, 0] * 0.7)[:, None, None]
    cx = rng.uniform(radius[:, 0, 0] * 0.7, s - radius[:, 0, 0] * 0.7)[:, None, None]
    rot = rng.uniform(-np.pi / 9, np.pi / 9, (n, 1, 1)).astype(np.float32)
    dx, dy = (xx - cx) / radius, (cy - yy) / radius  # v points up
    u = np.cos(rot) * dx + np.sin(rot) * dy
    v = -np.sin(rot) * dx + np.cos(rot) * dy
    mask = _shape_mask(y, u, v)[:, None]  # (n, 1, H, W)
    direction = rng.normal(size=(n, 3, 1, 1))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    fg = (bg + direction * rng.uniform(0.5, 1.0, (n, 1, 1, 1))).astype(np.float32)
    img = np.where(mask, fg, img)
    # clutter: small disks or squares of random colour
    count = rng.integers(1, 4, n)
    for k in range(3):
        on = (count > k)[:, None, None, None]
        rr = rng.uniform(1.0, 2.5, (n, 1, 1))
        py, px = rng.uniform(0, s, (n, 1, 1)), rng.uniform(0, s, (n, 1, 1))
        square = rng.random((n, 1, 1)) < 0.5
        d = np.where(square, np.maximum(np.abs(xx - px), np.abs(yy - py)), np.sqrt((xx - px) ** 2 + (yy - py) ** 2))
        img = np.where(on & (d < rr)[:, None], col(3), img)
    # illumination and noise
    gain = rng.uniform(0.6, 1.4, (n, 1, 1, 1))
    offset = rng.uniform(-0.2, 0.2, (n, 1, 1, 1))
    g_theta = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    g_amp = rng.uniform(0.0, 0.5, (n, 1, 1))
    grad = g_amp * ((np.cos(g_theta) * (xx - s / 2) + np.sin(g_theta) * (yy - s / 2)) / s)
    img = img * gain + offset + grad[:, None]
    img = img + rng.normal(0.0, 0.06, img.shape)
    return img.astype(np.float32), y


@cache
def load_scenes(n_train: int = 5000, n_test: int = 1000, seed: int = SCENES_SEED) -> DataSplit:
    """Scenes as a :class:`DataSplit` of ``(N, 3, 32, 32)`` images, standardized per channel with train statistics."""
    x, y = make_scenes(n_train + n_test, seed)
    mean = x[:n_train].mean(axis=(0, 2, 3), keepdims=True)
    std = x[:n_train].std(axis=(0, 2, 3), keepdims=True)
    x = (x - mean) / std
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    return DataSplit("scenes", xt[:n_train].clone(), yt[:n_train].clone(), xt[n_train:].clone(), yt[n_train:].clone(), 10)
