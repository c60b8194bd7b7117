"""The backward of a closed-form autograd Function replayed through autograd on its plain formula.

Closed-form backwards treat the saved statistics as constants: right for a first derivative, not
for a second one (``create_graph=True``), and some rare inputs (overflowed statistics) take a
slower path in the forward whose closed form is not worth writing. Both cases call
:func:`replay_grads`, which runs the layer's plain, differentiable formula on the saved inputs
and returns autograd's gradients — differentiable themselves when grad mode is on in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def replay_grads(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor | None], needs: Sequence[bool], gy: Tensor
) -> list[Tensor | None]:
    """Gradients of ``fn(*inputs)`` against ``gy`` for the inputs flagged in ``needs`` (None elsewhere).

    Inputs that already carry autograd history (the saved tensors in a double backward) are used
    as they are, so the result's graph reaches the caller's tensors; others are detached leaves.
    """
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        args = []
        for t, need in zip(inputs, needs):
            if isinstance(t, Tensor) and t.is_floating_point() and need and not (create and t.requires_grad):
                t = t.detach().requires_grad_()
            args.append(t)
        want = [i for i, (t, need) in enumerate(zip(args, needs)) if need and isinstance(t, Tensor)]
        y = fn(*args)
        grads = torch.autograd.grad(y, [args[i] for i in want], gy, create_graph=create, allow_unused=True)
    out: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(want, grads):
        out[i] = torch.zeros_like(args[i]) if g is None else g
    return out
