"""normkit's Triton GPU kernels: the ``"triton"`` backend.

Importing this package (done by :mod:`normkit.backend` on the first call that asks for
``backend="triton"``) registers its entry points with :func:`normkit.backend.register_triton_kernel`
for the ops below. ``"auto"`` does not choose them yet: their GPU speed has not been measured
(``scripts/gpu_check.sh`` measures it), so ``"auto"`` on CUDA keeps ATen's ops until the
``AUTO_RULES`` entry of an op is switched to ``"triton"`` on the strength of that measurement.

Math (the same formulas as :mod:`normkit.kernels.canonical`, whose docstrings cite the papers):

* LayerNorm (Ba, Kiros & Hinton, 2016, arXiv:1607.06450): ``y = (x − μ)/sqrt(σ² + eps)·w + b``,
  biased σ², over the last dim(s); RMSNorm (Zhang & Sennrich, 2019, arXiv:1910.07467):
  ``y = x/sqrt(mean(x²) + eps)·w``; weight offset (Gemma's ``1 + w``) arrives as ``offset + w``;
  no-affine and no-bias variants; a 2-D per-head weight ``(heads, head_dim)`` with statistics per head.
* fused residual add + norm returning the sum ``s = x + residual`` (rounded to the input dtype,
  as ``x + residual`` in torch, before its statistics).
* LayerNorm2d / RMSNorm2d over C of channels-first ``(N, C, *)`` input, without transposes.
* GroupNorm (Wu & He, 2018, arXiv:1803.08494) and InstanceNorm (Ulyanov et al., 2016,
  arXiv:1607.08022, GroupNorm with one channel per group).
* DyT (Zhu et al., "Transformers without Normalization", 2025, arXiv:2503.10622):
  ``y = w·tanh(α x) + b``.

Inputs: float32, bfloat16, float16 (statistics in float32) and float64 on CUDA; with
``TRITON_INTERPRET=1`` set, float32/float64 CPU tensors through Triton's interpreter (numpy, slow: for
tests) — the public layers with ``backend="triton"`` then accept CPU tensors and run this same code.
"""

from __future__ import annotations

from normkit import backend as _backend
from normkit.kernels.triton import launch, ops
from normkit.kernels.triton.ops import dyt, normalize, runs_on

#: ops whose layers reach the kernels through the ``normalize`` engine (their functional code calls it)
NORMALIZE_OPS = (
    "normalize", "layer_norm", "rms_norm", "add_norm", "layer_norm2d", "rms_norm2d", "group_norm", "instance_norm",
)

for _op in NORMALIZE_OPS:
    _backend.register_triton_kernel(_op, normalize, auto=False)
_backend.register_triton_kernel("dyt", dyt, auto=False)

__all__ = ["NORMALIZE_OPS", "dyt", "launch", "normalize", "ops", "runs_on"]
