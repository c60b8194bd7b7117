"""Measurements of :func:`~normkit.convert.fold_norms` and :func:`~normkit.convert.tune_mode_convbn`.

``python -m normkit.convert.measure`` prints both on a ResNet-18-shaped normkit ResNet (CPU):

* folding: inference ms per batch before and after folding, and the largest output difference;
* tune mode: saved-tensor MB and ms per fine-tuning step (BN in eval mode) against plain
  conv → BN(eval), and the largest gradient difference.

Times are the best of ``repeats``, the two variants run alternately (the machine may be shared); saved-tensor bytes count each
distinct storage autograd saves, parameters excluded (:func:`~normkit.convert.tune_mode.saved_tensor_bytes`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.convert.fold import fold_norms
from normkit.convert.tune_mode import saved_tensor_bytes, tune_mode_convbn
from normkit.models.resnet import ResNet

__all__ = ["measure_fold", "measure_tune_mode"]


def _resnet(widths: Sequence[int], seed: int) -> nn.Module:
    """ResNet-18 layout with random running statistics (a trained model's BN is not the identity)."""
    torch.manual_seed(seed)
    net = ResNet("basic", (2, 2, 2, 2), widths=widths, stem_width=widths[0], num_classes=10, small_input=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _best_ms(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` milliseconds of ``a`` and ``b``, run alternately (a shared machine's load
    drifts; alternating gives both the same conditions)."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta) * 1e3, min(tb) * 1e3


def measure_fold(
    batch: int = 16, size: int = 32, widths: Sequence[int] = (16, 32, 64, 128), repeats: int = 10, seed: int = 0
) -> dict[str, float]:
    """Inference before and after :func:`fold_norms`: ``eval_ms``, ``folded_ms``, ``folded`` (count), ``max_abs_diff``."""
    net = _resnet(widths, seed)
    x = torch.randn(batch, 3, size, size)
    report = fold_norms(net, example_inputs=x)
    out = {"folded": float(len(report.folded)), "max_abs_diff": float(report.max_abs_diff or 0.0)}
    with torch.inference_mode():
        out["eval_ms"], out["folded_ms"] = _best_ms(lambda: net(x), lambda: report.model(x), repeats)
    return out


def measure_tune_mode(
    batch: int = 16, size: int = 32, widths: Sequence[int] = (8, 16, 32, 64), repeats: int = 10, seed: int = 0
) -> dict[str, float]:
    """A fine-tuning step (forward + backward, BN in eval mode), conv → BN(eval) against tune mode:
    ``{eval,tune}_saved_mb``, ``{eval,tune}_ms`` and ``max_grad_diff``."""
    base = _resnet(widths, seed)
    tuned = tune_mode_convbn(copy.deepcopy(base)).model
    x = torch.randn(batch, 3, size, size)
    out: dict[str, float] = {}
    grads = {}
    steps = {}
    for label, net in (("eval", base), ("tune", tuned)):
        params = list(net.parameters())

        def step(net: nn.Module = net) -> None:
            net.zero_grad(set_to_none=True)
            net(x).square().mean().backward()

        out[f"{label}_saved_mb"] = saved_tensor_bytes(step, params) / 2**20
        grads[label] = [p.grad.clone() for p in params]
        steps[label] = step
    out["eval_ms"], out["tune_ms"] = _best_ms(steps["eval"], steps["tune"], repeats)
    out["max_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads["eval"], grads["tune"]))
    return out


def main() -> None:
    """Print :func:`measure_fold` and :func:`measure_tune_mode` with their defaults."""
    f = measure_fold()
    print("fold_norms: ResNet-18 layout (widths 16-128), batch 16, 32x32, CPU inference (best of 10, alternating)")
    print(f"  {int(f['folded'])} BatchNorms folded, max |folded - original| = {f['max_abs_diff']:.2g}")
    print(f"  conv->BN(eval) {f['eval_ms']:.1f} ms, folded {f['folded_ms']:.1f} ms: x{f['eval_ms'] / f['folded_ms']:.2f}")
    t = measure_tune_mode()
    print("tune_mode_convbn: ResNet-18 layout (widths 8-64), batch 16, 32x32, CPU fine-tuning step, BN in eval mode (best of 10)")
    print(f"  conv->BN(eval): saved tensors {t['eval_saved_mb']:.1f} MB, {t['eval_ms']:.1f} ms/step")
    print(f"  tune mode:      saved tensors {t['tune_saved_mb']:.1f} MB, {t['tune_ms']:.1f} ms/step")
    print(f"  saved-tensor memory {1 - t['tune_saved_mb'] / t['eval_saved_mb']:.0%} lower, "
          f"time x{t['eval_ms'] / t['tune_ms']:.2f}; max |grad difference| {t['max_grad_diff']:.2g}")


if __name__ == "__main__":
    main()
