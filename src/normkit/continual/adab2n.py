"""AdaB²N moved to :mod:`normkit.nn.adab2n` (every registered layer lives under ``nn``); re-exported here."""

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
    "adab2n_eta",
    "adab2n_layers",
    "adab2n_regularizer",
    "adab2n_sample_weights",
    "adab2n_statistics",
    "convert_adab2n",
    "end_task",
    "set_task_ids",
    "set_task_labels",
]
