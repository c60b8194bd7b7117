"""Moved to :mod:`normkit.data.digits` (the data is shared with adapt and continual).

The old import path is the new module itself (an alias in ``sys.modules``), so no name is listed twice.
"""

import sys

from normkit.data import digits as _moved

sys.modules[__name__] = _moved
