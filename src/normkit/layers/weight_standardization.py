"""Moved to :mod:`normkit.nn.weight_standardization`; re-exported here so old imports keep working."""

from normkit.nn.weight_standardization import EpsPlacement, WSConv2d, WSLinear, standardize_weight, weight_standardize_

__all__ = ["EpsPlacement", "WSConv2d", "WSLinear", "standardize_weight", "weight_standardize_"]
