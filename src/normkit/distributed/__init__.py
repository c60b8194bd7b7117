"""Batch-dependent norms under ``torch.distributed``: conversion and buffer utilities.

* :func:`convert_sync_norms` — every torch ``BatchNorm*`` / ``SyncBatchNorm`` and every normkit
  batch-dependent layer of a model normalizes with the statistics of the whole distributed batch in
  training (:mod:`normkit.sync`: one packed ``all_reduce`` per layer call, gloo on CPU and NCCL on CUDA).
* :func:`average_norm_buffers` / :func:`broadcast_norm_buffers` — make running statistics and counters
  (incl. PowerNorm's and Unified Norm's windows and step counters) equal on every process, e.g. before
  evaluation or checkpointing when the norms were *not* synchronized (timm's ``distribute_bn``).

Benchmark: ``python -m normkit.distributed.bench`` (run it under ``torchrun``).
"""

from normkit.distributed.buffers import average_norm_buffers, broadcast_norm_buffers, norm_modules
from normkit.distributed.convert import convert_sync_norms

__all__ = ["average_norm_buffers", "broadcast_norm_buffers", "convert_sync_norms", "norm_modules"]
