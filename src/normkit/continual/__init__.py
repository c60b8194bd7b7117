"""Continual learning: AdaB²N and a small online class-incremental benchmark (Split-Digits + replay).

* :mod:`normkit.nn.adab2n` (re-exported here) — :class:`AdaB2N` (Lyu et al. 2023, arXiv:2310.08855),
  :func:`convert_adab2n`, the per-step task labels, the regulariser.
* :mod:`normkit.continual.replay` — a reservoir-sampling replay buffer.
* :mod:`normkit.continual.split_digits` — Split-Digits (5 tasks × 2 classes of scikit-learn's
  digits) and an online experience-replay training loop reporting final average accuracy.
"""

from normkit.continual.replay import ReservoirBuffer
from normkit.continual.split_digits import ContinualResult, TaskData, load_split_digits, train_online
from normkit.nn.adab2n import (
    ADAB2N,
    AdaB2N,
    adab2n_eta,
    adab2n_layers,
    adab2n_regularizer,
    adab2n_sample_weights,
    adab2n_statistics,
    convert_adab2n,
    end_task,
    set_task_ids,
    set_task_labels,
)

__all__ = [
    "ADAB2N",
    "AdaB2N",
    "ContinualResult",
    "ReservoirBuffer",
    "TaskData",
    "adab2n_eta",
    "adab2n_layers",
    "adab2n_regularizer",
    "adab2n_sample_weights",
    "adab2n_statistics",
    "convert_adab2n",
    "end_task",
    "load_split_digits",
    "set_task_ids",
    "set_task_labels",
    "train_online",
]
