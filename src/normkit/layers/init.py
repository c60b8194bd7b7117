"""Moved to :mod:`normkit.nn.init`; re-exported here so old imports keep working."""

from normkit.nn.init import fan_in, lecun_normal_

__all__ = ["fan_in", "lecun_normal_"]
