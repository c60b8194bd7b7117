"""AdaB²N moved to :mod:`normkit.nn.adab2n` (every registered layer lives under ``nn``).

The old import path is the new module itself (an alias in ``sys.modules``), so no name is listed twice.
"""

import sys

from normkit.nn import adab2n as _moved

sys.modules[__name__] = _moved
