"""Argument checks and step plumbing shared by the optimizers, with torch.optim's wording (``Invalid learning rate: -1``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def check_lr(lr: Any) -> None:
    """``lr`` must be a non-negative number (or a 0-d tensor, as torch's optimizers accept)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got a tensor of shape {tuple(lr.shape)}")
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float, got {type(lr).__name__}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (expected lr >= 0)")


def check_nonnegative(name: str, value: Any) -> None:
    """A float hyper-parameter that must be >= 0 (eps, weight_decay, delta, ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name} value: {value} (expected {name} >= 0)")


def check_unit(name: str, value: Any) -> None:
    """A coefficient in [0, 1) (a momentum or an EMA factor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (expected 0 <= {name} < 1)")


def check_betas(betas: Any) -> None:
    """Two EMA coefficients, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_unit("beta parameter at index 0", betas[0])
    check_unit("beta parameter at index 1", betas[1])


def check_hyperparameters(lr: Any, *, betas: Any = None, momentum: Any = None, **nonnegative: Any) -> None:
    """Check an optimizer's constructor arguments in one call: ``lr`` (:func:`check_lr`), ``betas``
    (:func:`check_betas`) and ``momentum`` in [0, 1) when given, then every keyword of ``nonnegative``
    (eps, weight_decay, ...) >= 0 in the order given, so the first bad argument is the one reported."""
    check_lr(lr)
    if betas is not None:
        check_betas(betas)
    if momentum is not None:
        check_unit("momentum", momentum)
    for name, value in nonnegative.items():
        check_nonnegative(name, value)


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimizer's ``closure`` (None without one), evaluated with gradients enabled as
    torch's optimizers do: ``step`` itself runs under ``torch.no_grad()``, the closure's backward must not."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(group: dict[str, Any], name: str) -> list[torch.Tensor]:
    """The parameters of ``group`` that have a gradient this step, checked by :func:`check_dense` for
    optimizer ``name`` (the first lines of every ``step`` here)."""
    params = [p for p in group["params"] if p.grad is not None]
    check_dense(params, name)
    return params


def check_dense(params: Iterable[torch.Tensor], name: str) -> None:
    """The optimizers here have no sparse path (their norms and projections need the whole gradient), and no
    complex one: their moments (``g·g`` instead of ``g·conj(g)``), row dot products and cosine tests are
    written for real tensors and would be silently wrong (pass ``torch.view_as_real(p)`` instead)."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients (got one for a {tuple(p.shape)} parameter)")
        if p.is_complex():
            raise TypeError(
                f"{name} expects real parameters, got a {p.dtype} parameter of shape {tuple(p.shape)} "
                "(optimize torch.view_as_real(p) instead)"
            )


def use_foreach(foreach: bool | None, params: list[torch.Tensor]) -> bool:
    """``foreach=None`` means: multi-tensor kernels when every tensor is on an accelerator (on CPU they
    are a Python loop over the same per-tensor ops, so there is nothing to gain)."""
    if foreach is not None:
        return bool(foreach)
    return bool(params) and all(p.device.type not in ("cpu", "meta") for p in params)


def adam_moments_(
    state: dict[torch.Tensor, dict[str, Any]], params: list[torch.Tensor], group: dict[str, Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Adam's moment update for ``params`` (all with a gradient), shared by AdamP and LAMB.

    Creates ``step``/``exp_avg``/``exp_avg_sq`` on first use, counts the step, and updates
    ``m ← β1 m + (1 − β1) g`` (one lerp pass, as torch's Adam) and ``v ← β2 v + (1 − β2) g²``.
    Returns ``(grads, exp_avgs, exp_avg_sqs)``.
    """
    beta1, beta2 = group["betas"]
    grads = [p.grad for p in params]
    for p in params:
        s = state[p]
        if len(s) == 0:
            s["step"] = 0
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["step"] += 1
    ms = [state[p]["exp_avg"] for p in params]
    vs = [state[p]["exp_avg_sq"] for p in params]
    if use_foreach(group["foreach"], params):
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    else:
        for m, v, g in zip(ms, vs, grads):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return grads, ms, vs
