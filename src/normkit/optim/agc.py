"""Adaptive gradient clipping (AGC) from NFNets (Brock, De, Smith, Simonyan 2021).

Paper: "High-Performance Large-Scale Image Recognition Without Normalization", Brock, De, Smith,
Simonyan, ICML 2021, arXiv 2102.06171; official code google-deepmind/deepmind-research
``nfnets/optim.py`` (``SGD_AGC``) and ``nfnets/agc_optax.py``, restated here for PyTorch's layouts.
Per parameter ``W`` with gradient ``G``, unit by unit (one unit = one output row):

    ‖W_i‖* = max(‖W_i‖_F, eps)                        (eps = 1e-3)
    G_i ← G_i · λ ‖W_i‖* / max(‖G_i‖_F, 1e-6)   if ‖G_i‖_F > λ ‖W_i‖*   else G_i     (λ = clipping = 0.01)

Unit-wise norms: a convolution weight ``(out, in, *k)`` (OIHW) has one norm per output unit over
(in, *k) (the official HWIO code reduces over H, W, I); a linear weight ``(out, in)`` one per
output row (the official IO code reduces over I); vectors and scalars (biases, gains), and as in the
official code any tensor that is a vector once its size-1 dims are squeezed (e.g. ``(n, 1)``), one
norm over the whole tensor.

Why: without normalization layers nothing keeps a layer's gradient in proportion to its weights;
clipping the ratio ‖G‖/‖W‖ per unit bounds the relative change of every unit per step, which is
what lets NF-ResNets train at large batch sizes and learning rates.

Parameter groups (official ``experiment_nfnets.py``): every parameter is clipped except the final
classifier (``clipping=None``); gains and biases get no weight decay. :func:`nfnet_param_groups`
builds that; the :class:`AGC` wrapper reads each group's ``clipping`` (and ``agc_eps``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from normkit.optim._checks import check_nonnegative, closure_loss


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm per output unit, shaped to broadcast against ``x``: over dims 1.. for ndim >= 2, the
    whole tensor for vectors and scalars.

    As the official ``unitwise_norm`` (which tests ``len(jnp.squeeze(x).shape) <= 1``), a tensor with at
    most one dimension of size > 1 counts as a vector: a ``Linear(1, n)`` weight ``(n, 1)`` or a
    ``Conv2d(1, n, 1)`` weight ``(n, 1, 1, 1)`` gets one norm over the whole tensor, not one per element.
    """
    if sum(s != 1 for s in x.shape) <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def _check(clipping: Any, eps: Any) -> None:
    check_nonnegative("clipping", clipping)
    check_nonnegative("eps", eps)


@torch.no_grad()
def adaptive_clip_grad_(
    params: torch.Tensor | Iterable[torch.Tensor],
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> None:
    """Clip ``p.grad`` of every parameter in place, unit-wise, to ``clipping · max(‖p‖, eps)``.

    Defaults as NFNets: ``clipping=0.01`` (λ, the paper's value for batch 4096), ``eps=1e-3``.
    Parameters without a gradient are skipped.
    """
    _check(clipping, eps)
    if isinstance(params, torch.Tensor):
        params = [params]
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(f"adaptive_clip_grad_ does not support sparse gradients (parameter {tuple(p.shape)})")
        max_norm = unitwise_norm(p).clamp_min(eps) * clipping
        g_norm = unitwise_norm(g)
        # one factor per unit (1 where the unit is not clipped), then one in-place pass over g
        factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        g.mul_(factor.to(g.dtype))


class AGC(torch.optim.Optimizer):
    """Wrap an optimizer: each ``step`` clips the gradients with AGC, then steps the optimizer.

    The wrapper shares the wrapped optimizer's ``param_groups`` and ``state`` (LR schedulers,
    ``state_dict``, ``zero_grad`` see one optimizer). Per group, ``clipping`` (``None``: not
    clipped) and ``agc_eps`` override the wrapper's ``clipping`` / ``eps``; ``exclude`` lists
    parameters never clipped (not saved in the state dict: prefer a group with ``clipping=None``).

    >>> opt = AGC(torch.optim.SGD(nfnet_param_groups(model), lr=0.1, momentum=0.9, nesterov=True))  # doctest: +SKIP
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Iterable[torch.Tensor] = (),
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"AGC wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check(clipping, eps)
        for group in optimizer.param_groups:
            if group.get("clipping") is not None:
                check_nonnegative("clipping", group["clipping"])
        self.optimizer = optimizer
        self.clipping = clipping
        self.eps = eps
        self._exclude = {id(p) for p in exclude}
        # What torch.optim.Optimizer.__init__ sets up, minus taking the parameters over: the groups
        # and the state are the wrapped optimizer's own objects.
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._share()
        self._warned_capturable_if_run_uncaptured = True

    def _share(self) -> None:
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups

    def clip_(self) -> None:
        """Clip the current gradients of every group (what ``step`` does first)."""
        for group in self.param_groups:
            clipping = group.get("clipping", self.clipping)
            if clipping is None:
                continue
            params = [p for p in group["params"] if id(p) not in self._exclude]
            adaptive_clip_grad_(params, clipping, group.get("agc_eps", self.eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure_loss(closure)
        self.clip_()
        self.optimizer.step()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._share()

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps only defaults/state/groups, not the wrapped optimizer
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._share()

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps}, optimizer={self.optimizer!r})"


def nfnet_param_groups(
    model: nn.Module,
    *,
    weight_decay: float = 2e-5,
    clipping: float = 0.01,
    classifier: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """The NFNets parameter groups (official ``experiment_nfnets.py``).

    * gains and biases (parameter names containing ``gain`` or ``bias``, and every parameter with
      at most one dimension, e.g. norm gains) get ``weight_decay=0``; they are still clipped;
    * the final classifier's parameters get ``clipping=None`` (by default the last ``nn.Linear`` in
      ``model.modules()`` order; ``classifier`` names the modules instead);
    * everything else: ``weight_decay`` (2e-5) and ``clipping`` (λ = 0.01).

    For :class:`AGC` around any torch optimizer (the weight decay here is the optimizer's own:
    NFNets adds it to the gradient, like ``torch.optim.SGD``). Empty groups are left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_nonnegative("weight_decay", weight_decay)
    check_nonnegative("clipping", clipping)
    modules = dict(model.named_modules())
    if classifier is None:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        heads = set(linears[-1:])
    else:
        heads = set(classifier)
        unknown = heads - set(modules)
        if unknown:
            raise ValueError(f"classifier names no module of the model: {sorted(unknown)}")
    head_params = {id(p) for name in heads for p in modules[name].parameters()}
    # (decayed, clipped) -> parameters, in the order the groups are returned
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(d, c): [] for c in (True, False) for d in (True, False)}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        decay = not ("gain" in leaf or "bias" in leaf or p.dim() <= 1)
        groups[(decay, id(p) not in head_params)].append(p)
    out = []
    for (decay, clip), params in groups.items():
        if params:
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "clipping": clipping if clip else None})
    return out
