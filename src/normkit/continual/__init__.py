"""Continual learning: AdaB²N and a small online class-incremental benchmark (Split-Digits + replay).

* :mod:`normkit.nn.adab2n` (re-exported here) — :class:`AdaB2N` (Lyu et al. 2023, arXiv:2310.08855),
  :func:`convert_adab2n`, the per-step task labels, the regulariser.
* :mod:`normkit.continual.replay` — a reservoir-sampling replay buffer.
* :mod:`normkit.continual.split_digits` — Split-Digits (5 tasks × 2 classes of scikit-learn's
  digits) and an online experience-replay training loop reporting final average accuracy.
"""

from normkit.continual.replay import ReservoirBuffer
from normkit.continual.split_digits import ContinualResult, TaskData, load_split_digits, train_online
from normkit.nn import adab2n as _adab2n
from normkit.nn.adab2n import *  # noqa: F403 - AdaB²N re-exported, its names listed once in nn.adab2n

__all__ = ["ContinualResult", "ReservoirBuffer", "TaskData", "load_split_digits", "train_online", *_adab2n.__all__]
