"""Built-in data generators (nothing downloaded), shared by the bench, the adapt streams and continual.

Kept apart from :mod:`normkit.bench` so that :mod:`normkit.adapt` and :mod:`normkit.continual`
can use the same data without importing the bench (dependencies point down: the bench uses
them, not the other way round). Needs scikit-learn (``pip install 'normkit[bench]'``), imported
on first use.
"""

from normkit.data.digits import SPLIT_SEED, DataSplit, DigitsPixels, digits_pixels, load_digits, standardize

__all__ = ["SPLIT_SEED", "DataSplit", "DigitsPixels", "digits_pixels", "load_digits", "standardize"]
