"""Moved to :mod:`normkit.nn.init`.

The old import path is the new module itself (an alias in ``sys.modules``), so no name is listed twice.
"""

import sys

from normkit.nn import init as _moved

sys.modules[__name__] = _moved
