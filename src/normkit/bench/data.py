"""Moved to :mod:`normkit.data` (the data is shared with adapt and continual); re-exported here."""

from normkit.data.digits import SPLIT_SEED, DataSplit, DigitsPixels, digits_pixels, load_digits, standardize

__all__ = ["SPLIT_SEED", "DataSplit", "DigitsPixels", "digits_pixels", "load_digits", "standardize"]
