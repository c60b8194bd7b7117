"""``TestTimeAdapter``: stream shifted data through a trained model and adapt its normalization as you go.

::

    from normkit.adapt import TestTimeAdapter
    adapter = TestTimeAdapter(model, "alpha_bn", alpha=0.1)   # deep copy; `model` is left as it is
    for x in stream:
        logits = adapter(x)                                    # predicts and adapts
    adapter.reset()                                            # back to the source model, bit for bit

Methods (every ``_BatchNorm`` in the model — torch's BatchNorm1d/2d/3d, SyncBatchNorm, normkit's
BatchNorm/BatchNorm1d/2d/3d, ``channels_last`` included — is replaced in a deep copy):

==============  ======================================================================  =====================
method          statistics used to normalize                                             batch 1 on ``(1, C)``
==============  ======================================================================  =====================
``source``      the source running statistics (no adaptation)                            works
``tbn``         the test batch's (AdaBN online; "BN adapt" of TENT)                     error
``alpha_bn``    α·test batch + (1 − α)·source, α = 0.1 (You et al. 2021)                works
``ema_bn``      running statistics updated by every test batch (momentum 0.1)           error
``robust_bn``   RoTTA's robust BN (momentum 0.05)                                        error
``unmix_tns``   per-sample stats mixed with K = 16 online components (Tomar et al.)     works (source stats)
``tent``        test batch statistics + entropy minimisation on norm affine (Wang)      error
==============  ======================================================================  =====================

"Batch 1 on ``(1, C)`` features" means one value per channel (e.g. a BatchNorm1d after a linear
layer): no batch variance exists there. On conv features (H·W > 1) every method works at batch
size 1, since the statistics also run over the positions.

**α convention.** Here α weights the *test* statistics: ``μ = α·μ_test + (1 − α)·μ_source`` (as
You et al. and mariodoebler/test-time-adaptation's ``BN.ALPHA``). TTAB's ``AdaptiveBatchNorm(prior)``
uses the opposite: ``prior`` weights the *source* statistics (``prior = 1 − α``), and Schneider et al.
2020 (arXiv:2006.16971) weight the source by ``N/(N + n)`` with a pseudo sample size N.

All layers adapt on every call (their ``.training`` flag is ignored); the model copy is put in
``eval()`` so dropout and other layers behave as at inference. Layers other than ``_BatchNorm``
(LayerNorm, GroupNorm, other batch-dependent normkit norms) keep their source behaviour, except that
``tent`` also trains the affine of LayerNorm/GroupNorm/RMSNorm/InstanceNorm and every registered
normkit norm (``norms="all"``, as mariodoebler's TENT; ``norms="bn"`` for the original TENT).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.adapt._layers import (
    AlphaBatchNorm,
    EMABatchNorm,
    RobustBatchNorm,
    TestBatchNorm,
    TTABatchNorm,
    UnMixTNSBatchNorm,
)
from normkit.adapt._norms import named_norms
from normkit.nn.replace import replace_modules
from normkit.registry import Paper
from normkit.sync import GroupSum, check_process_group

ADABN = Paper("Revisiting Batch Normalization For Practical Domain Adaptation", 2016, "1603.04779", "Li, Wang, Shi, Liu, Hou")
TEST_TIME_BN = Paper(
    "Improving robustness against common corruptions by covariate shift adaptation", 2020, "2006.16971",
    "Schneider, Rusak, Eck, Bringmann, Brendel, Bethge",
)  # fmt: skip
ALPHA_BN = Paper("Test-time Batch Statistics Calibration for Covariate Shift", 2021, "2110.04065", "You, Li, Zhao")
ROTTA = Paper("Robust Test-Time Adaptation in Dynamic Scenarios", 2023, "2303.13899", "Yuan, Xie, Li")
UNMIX_TNS = Paper(
    "Un-Mixing Test-Time Normalization Statistics: Combatting Label Temporal Correlation", 2024, "2401.08328",
    "Tomar, Vray, Thiran, Bozorgtabar",
)  # fmt: skip
TENT = Paper(
    "Tent: Fully Test-Time Adaptation by Entropy Minimization", 2021, "2006.10726",
    "Wang, Shelhamer, Liu, Olshausen, Darrell",
)  # fmt: skip

#: method → its keyword options and their defaults
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "source": {},
    "tbn": {},
    "alpha_bn": {"alpha": 0.1},
    "ema_bn": {"momentum": 0.1},
    "robust_bn": {"momentum": 0.05},
    "unmix_tns": {
        "num_components": 16, "batch_size": None, "batch_size_max": 64, "temperature": 0.07, "init_coeff": 0.5,
        "seed": 0,
    },
    "tent": {"optimizer": "adam", "lr": 1e-3, "steps": 1, "norms": "all"},
}  # fmt: skip
METHODS: tuple[str, ...] = tuple(METHOD_OPTIONS)
#: methods without a gradient step (they run under ``torch.no_grad()``)
GRADIENT_FREE: tuple[str, ...] = tuple(m for m in METHODS if m != "tent")

_LAYERS: dict[str, type[TTABatchNorm]] = {
    "tbn": TestBatchNorm,
    "alpha_bn": AlphaBatchNorm,
    "ema_bn": EMABatchNorm,
    "robust_bn": RobustBatchNorm,
    "unmix_tns": UnMixTNSBatchNorm,
    "tent": TestBatchNorm,
}


def _logits(out: Any) -> Any:
    """The logits to adapt on, classes on dim 1: a tensor as returned, or a transformers ``ModelOutput``'s
    ``.logits`` with its last dim (classes / vocabulary: ``(N, C)``, ``(N, T, V)``) moved to dim 1."""
    logits = getattr(out, "logits", None) if not isinstance(out, Tensor) else None
    return logits.movedim(-1, 1) if isinstance(logits, Tensor) and logits.dim() >= 2 else out


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of ``softmax(logits)`` over dim 1 (TENT's loss before the batch mean)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class TestTimeAdapter(nn.Module):
    """Wrap a trained model for test-time adaptation of its BatchNorm statistics (and TENT).

    Args:
        model: a trained model with at least one ``_BatchNorm`` layer (TENT: or any norm with an
            affine). Deep-copied unless ``inplace=True``; the copy is ``self.model``.
        method: one of :data:`METHODS` (see the module docstring for the table).
        episodic: reset to the source state after every call (each batch adapts from scratch).
        inplace: adapt ``model`` itself (its BN layers are replaced) instead of a copy.
        process_group: a ``torch.distributed.ProcessGroup`` or ``"world"``: the test-batch statistics
            (``tbn``, ``alpha_bn``, ``ema_bn``, ``robust_bn``, TENT's BN) come from the whole distributed
            test batch — every process's slice, count-weighted (:mod:`normkit.sync`), so the statistics
            and outputs equal a single process adapting on the concatenated batch. ``unmix_tns`` keeps
            its per-process statistics; TENT's gradients are not averaged (wrap the step yourself).
        **options: the method's options (:data:`METHOD_OPTIONS`):

            * ``alpha_bn``: ``alpha=0.1`` — weight of the test-batch statistics
              (:class:`~normkit.adapt._layers.AlphaBatchNorm`; You et al. 2021, arXiv:2110.04065).
            * ``ema_bn``: ``momentum=0.1`` (:class:`~normkit.adapt._layers.EMABatchNorm`).
            * ``robust_bn``: ``momentum=0.05`` (:class:`~normkit.adapt._layers.RobustBatchNorm`;
              Yuan et al. 2023, arXiv:2303.13899).
            * ``unmix_tns``: ``num_components=16, batch_size=None`` (None: the first batch's size),
              ``batch_size_max=64, temperature=0.07, init_coeff=0.5, seed=0``
              (:class:`~normkit.adapt._layers.UnMixTNSBatchNorm`; Tomar et al. 2024, arXiv:2401.08328).
              ``seed`` seeds the components' initial noise (one generator, layers in ``named_modules`` order).
            * ``tent``: ``optimizer="adam"`` (Adam, betas (0.9, 0.999), no weight decay: TENT's CIFAR
              setting) or ``"sgd"`` (momentum 0.9: its ImageNet setting) or a callable
              ``params -> torch.optim.Optimizer``; ``lr=1e-3``; ``steps=1`` gradient steps per batch;
              ``norms="all"`` (BN + every other norm's ``weight``/``bias``) or ``"bn"`` (BN only,
              the original TENT). Wang et al. 2021, arXiv:2006.10726.

    ``adapter(x)`` returns the model's output and adapts as a side effect. A model may return a
    transformers ``ModelOutput`` (e.g. ``LlamaForCausalLM``): TENT then minimises the entropy of
    ``.logits`` over their last dim (classes / vocabulary) and returns the output with detached logits;
    transformers' norms (``LlamaRMSNorm``, ...) are found by :func:`normkit.nn.recognize.recognise_norm`.
    TENT follows the official
    ``forward_and_adapt``: forward with test-batch BN statistics, loss = mean entropy of the softmax,
    one optimizer step; the output returned is the one computed *before* the step (detached here),
    and the step runs under ``torch.enable_grad()`` so the adapter also works inside
    ``torch.no_grad()``. TENT's BN layers use the test-batch statistics (as the official
    ``configure_model``); the official code also puts the model in train mode (dropout on), this
    adapter keeps it in eval mode (as mariodoebler/test-time-adaptation).

    ``reset()`` restores every parameter and buffer of the adapted model (and TENT's optimizer) to
    their values right after construction, bit for bit.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        model: nn.Module,
        method: str = "tbn",
        *,
        episodic: bool = False,
        inplace: bool = False,
        process_group: Any = None,
        **options: Any,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"TestTimeAdapter expects an nn.Module, got {type(model).__name__}")
        if not isinstance(method, str) or method.lower() not in METHOD_OPTIONS:
            raise ValueError(f"unknown test-time adaptation method {method!r}; valid methods: {', '.join(METHODS)}")
        method = method.lower()
        unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
        if unknown:
            valid = ", ".join(METHOD_OPTIONS[method]) or "none"
            raise TypeError(
                f"TestTimeAdapter(method={method!r}) got unexpected option(s) {', '.join(unknown)}; its options: {valid}"
            )
        self.method = method
        self.options = {**METHOD_OPTIONS[method], **options}
        self.episodic = bool(episodic)
        model = model if inplace else copy.deepcopy(model)
        model.eval()
        self.adapted_layers: list[str] = []
        model = self._replace_batch_norms(model)
        self.process_group = check_process_group(process_group)
        if process_group is not None:  # test-batch statistics over every process's batch
            for m in model.modules():
                if isinstance(m, TTABatchNorm):
                    m.reducer = GroupSum(process_group)
        self.model = model
        self.tent_parameters: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        if method == "tent":
            self._configure_tent()
        elif method != "source" and not self.adapted_layers:
            raise ValueError(
                f"TestTimeAdapter(method={method!r}) found no BatchNorm layer to adapt in {type(model).__name__} "
                "(it adapts torch _BatchNorm layers: nn.BatchNorm1d/2d/3d, SyncBatchNorm, normkit BatchNorm*); "
                "method='tent' also adapts LayerNorm/GroupNorm affine parameters"
            )
        self._initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ construction

    def _layer_kwargs(self) -> dict[str, Any]:
        o = self.options
        if self.method == "alpha_bn":
            return {"alpha": o["alpha"]}
        if self.method in ("ema_bn", "robust_bn"):
            return {"momentum": o["momentum"]}
        if self.method == "unmix_tns":
            return {k: o[k] for k in ("num_components", "batch_size", "batch_size_max", "temperature", "init_coeff")}
        return {}

    def _replace_batch_norms(self, model: nn.Module) -> nn.Module:
        if self.method == "source":
            self.adapted_layers = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
            return model
        cls = _LAYERS[self.method]
        kwargs = self._layer_kwargs()
        if self.method == "unmix_tns":
            seed = self.options["seed"]
            if not isinstance(seed, int):
                raise TypeError(f"unmix_tns: seed must be an int, got {seed!r}")
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        report = replace_modules(
            model, lambda name, m: isinstance(m, _BatchNorm), lambda name, bn: cls(bn, name, **kwargs)
        )
        self.adapted_layers.extend(name for name, _, _ in report)
        return report.model

    def _configure_tent(self) -> None:
        o = self.options
        if o["norms"] not in ("all", "bn"):
            raise ValueError(f"tent: norms must be 'all' (BN + LN/GN/... affine) or 'bn', got {o['norms']!r}")
        if not isinstance(o["steps"], int) or o["steps"] < 1:
            raise ValueError(f"tent: steps must be a positive int, got {o['steps']!r}")
        self.model.requires_grad_(False)
        params: list[nn.Parameter] = []
        owners = [(n, m) for n, m in self.model.named_modules() if isinstance(m, TTABatchNorm)]
        if o["norms"] == "all":
            owners += list(named_norms(self.model, "all"))
        for owner, m in owners:
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter) and all(p is not q for q in params):
                    p.requires_grad_(True)
                    params.append(p)
                    self.tent_parameters.append(f"{owner}.{pname}" if owner else pname)
        if not params:
            raise ValueError(
                f"TestTimeAdapter(method='tent') found no normalization affine parameter to adapt in "
                f"{type(self.model).__name__} (BatchNorm{'' if o['norms'] == 'bn' else ', LayerNorm, GroupNorm, ...'} "
                "weight/bias; affine=False layers have none)"
            )
        self._tent_params = params
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        opt, lr = self.options["optimizer"], self.options["lr"]
        if opt == "adam":
            return torch.optim.Adam(self._tent_params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        if opt == "sgd":
            return torch.optim.SGD(self._tent_params, lr=lr, momentum=0.9)
        if callable(opt):
            made = opt(self._tent_params)
            if not isinstance(made, torch.optim.Optimizer):
                raise TypeError(f"tent: optimizer callable must return a torch.optim.Optimizer, got {type(made).__name__}")
            return made
        raise ValueError(f"tent: optimizer must be 'adam', 'sgd' or a callable params -> Optimizer, got {opt!r}")

    # ------------------------------------------------------------------ use

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._tent_step(*args, **kwargs) if self.method == "tent" else self.model(*args, **kwargs)
        if self.episodic:
            self.reset()
        return out

    def _tent_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.optimizer is not None
        with torch.enable_grad():
            for _ in range(self.options["steps"]):
                out = self.model(*args, **kwargs)
                logits = _logits(out)
                if not isinstance(logits, Tensor) or logits.dim() < 2:
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(out).__name__
                    raise ValueError(f"tent minimises the entropy of (N, num_classes, ...) logits; the model returned {got}")
                loss = softmax_entropy(logits).mean()
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if isinstance(out, Tensor):
            return out.detach()
        out["logits"] = out.logits.detach()  # a transformers ModelOutput: returned with its logits detached
        return out

    def reset(self) -> None:
        """Restore the adapted model (and TENT's optimizer) to the state right after construction."""
        self.model.load_state_dict(self._initial)
        if self.optimizer is not None:
            self.optimizer = self._make_optimizer()

    def train(self, mode: bool = True) -> TestTimeAdapter:
        """Sets the flag only: the wrapped model stays in ``eval()`` (adaptation does not depend on it)."""
        self.training = mode
        return self

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}" + (f", {opts}" if opts else "") + (", episodic=True" if self.episodic else "")
