"""Tools that put normkit into models people already have.

:func:`replace_norms` swaps the normalization layers of any ``nn.Module`` (torch's classes and the
transformers RMSNorm families, recognised by behaviour) for normkit's, exactly where it can and
saying so where it cannot.
"""

from __future__ import annotations

from normkit.convert.replace_norms import NormReplacement, NormReport, recognise_norm, replace_norms

__all__ = ["NormReplacement", "NormReport", "recognise_norm", "replace_norms"]
