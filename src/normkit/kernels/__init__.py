"""Fused normalization kernels behind the backend dispatch (:mod:`normkit.backend`)."""

from normkit.kernels.normalize import normalize

__all__ = ["normalize"]
