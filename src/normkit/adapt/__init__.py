"""Adapting normalization statistics: test-time adaptation, shifted-data streams, norm-only training.

* :class:`TestTimeAdapter` (:mod:`normkit.adapt.tta`) — ``source``, ``tbn``, ``alpha_bn``, ``ema_bn``,
  ``robust_bn``, ``unmix_tns``, ``tent`` on every BatchNorm of a trained model.
* :mod:`normkit.adapt.streams` — digits-C (scikit-learn digits under corruptions, severities 1–5),
  i.i.d. / label-correlated (Dirichlet) / mixed-domain streams.
* :mod:`normkit.adapt.norm_only` — :func:`train_only_norms`, :func:`train_random_subset`,
  :func:`freeze_norm_stats`, :func:`recompute_norm_stats`, :func:`gamma_report`.

The streams need scikit-learn (``pip install 'normkit[bench]'``) and are imported on first use.
"""

from normkit.adapt.norm_only import (
    FrozenNormStats,
    GammaReport,
    TrainableSummary,
    freeze_norm_stats,
    gamma_report,
    norm_parameter_count,
    recompute_norm_stats,
    train_only_norms,
    train_random_subset,
)
from normkit.adapt.tta import GRADIENT_FREE, METHOD_OPTIONS, METHODS, TestTimeAdapter, softmax_entropy

__all__ = [
    "GRADIENT_FREE",
    "METHODS",
    "METHOD_OPTIONS",
    "FrozenNormStats",
    "GammaReport",
    "TestTimeAdapter",
    "TrainableSummary",
    "freeze_norm_stats",
    "gamma_report",
    "norm_parameter_count",
    "recompute_norm_stats",
    "softmax_entropy",
    "train_only_norms",
    "train_random_subset",
]
