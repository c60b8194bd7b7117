"""Norm-only training and norm-statistics utilities.

* :func:`train_only_norms` — freeze everything but the normalization parameters: BatchNorm γ/β
  only (Frankle, Schwab, Morcos 2021, "Training BatchNorm and Only BatchNorm: On the Expressive
  Power of Random Features in CNNs", arXiv:2003.00152), LayerNorm only ("LN-tuning", Qi, Ruan, Zuo,
  Li 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models",
  arXiv:2211.08682), or shifts only (MobileTL, Chiang, Frumkin, Liang, Marculescu 2023, "MobileTL:
  On-device Transfer Learning with Inverted Residual Blocks", arXiv:2212.03246, which trains only
  the β of internal norms and freezes their γ and statistics — combine with :func:`freeze_norm_stats`).
* :func:`train_random_subset` — Frankle et al.'s control: train the same number of randomly
  chosen parameters elsewhere in the network.
* :func:`freeze_norm_stats` — batch-dependent norms keep using (and stop updating) their running
  statistics even when the model is in ``train()`` mode.
* :func:`recompute_norm_stats` — re-estimate the running statistics of every batch-dependent norm
  from a data loader (e.g. after fine-tuning, pruning or weight averaging).
* :func:`gamma_report` — how many norm scales γ went to ≈ 0 (Frankle et al.: about a third of the
  γ of BN-only deep ResNets do, disabling those features).

Norm layers are found by class: torch's norm classes and every class registered in
:mod:`normkit.registry` (see :func:`normkit.adapt._norms.is_norm`); "batch-dependent" means torch's
``_BatchNorm`` or a registered norm with ``batch_dependent=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.adapt._norms import NORM_KINDS, NormKind, named_norms
from normkit.nn.recognize import scale_offset
from normkit.registry import Paper

TRAINING_BN_ONLY = Paper(
    "Training BatchNorm and Only BatchNorm: On the Expressive Power of Random Features in CNNs", 2021, "2003.00152",
    "Frankle, Schwab, Morcos",
)  # fmt: skip
LN_TUNING = Paper(
    "Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models", 2022, "2211.08682",
    "Qi, Ruan, Zuo, Li",
)  # fmt: skip
MOBILETL = Paper(
    "MobileTL: On-device Transfer Learning with Inverted Residual Blocks", 2023, "2212.03246",
    "Chiang, Frumkin, Liang, Marculescu",
)  # fmt: skip


@dataclass(frozen=True)
class TrainableSummary:
    """What :func:`train_only_norms` / :func:`train_random_subset` left trainable."""

    trainable: int  # number of trainable scalars
    total: int  # number of scalars in the model
    names: tuple[str, ...] = field(default=())  # trainable parameter names

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} of {self.total:,} parameters trainable ({self.fraction:.3%}) in {len(self.names)} tensors"


def _check_kind(norms: str) -> None:
    if norms not in NORM_KINDS:
        raise ValueError(f"norms must be one of {', '.join(NORM_KINDS)}, got {norms!r}")


def train_only_norms(
    model: nn.Module,
    include: Sequence[str] = ("weight", "bias"),
    *,
    norms: NormKind = "batch",
    also: Sequence[str] = (),
) -> TrainableSummary:
    """Set ``requires_grad`` so that only normalization parameters train; returns what is trainable.

    Args:
        model: modified in place (``requires_grad`` of every parameter).
        include: which parameters of each norm layer train, by name: ``("weight", "bias")`` = γ and β
            (Frankle et al. 2021, LN-tuning), ``("bias",)`` = shifts only (MobileTL). Names are the
            layer's own parameters (not its children's).
        norms: ``"batch"`` — batch-dependent norms (BatchNorm and the like: "training BatchNorm and only
            BatchNorm"); ``"layer"`` — LayerNorm/RMSNorm-type norms (LN-tuning); ``"all"`` — every norm.
        also: names of submodules (or parameters) that train too, e.g. ``("head",)`` for Frankle et
            al.'s "BatchNorm + output layer" variant; a name matches itself and everything under it.

    Raises ValueError if no parameter matches (no such norm, or ``include`` names none of their
    parameters), naming what was looked for.

    Use an optimizer over ``[p for p in model.parameters() if p.requires_grad]``; the running statistics
    are not affected (see :func:`freeze_norm_stats` for MobileTL's frozen statistics).
    """
    include = (include,) if isinstance(include, str) else tuple(include)
    chosen = _norm_parameters(model, include, norms)
    if not include:
        raise ValueError("include must name at least one norm parameter, e.g. ('weight', 'bias') or ('bias',)")
    model.requires_grad_(False)
    names: list[str] = []
    for name, p in chosen:
        p.requires_grad_(True)
        names.append(name)
    for pname, p in model.named_parameters():
        if any(pname == a or pname.startswith(a + ".") for a in also) and not p.requires_grad:
            p.requires_grad_(True)
            names.append(pname)
    if not names:
        raise ValueError(
            f"train_only_norms found no parameter named {tuple(include)} in {norms!r} norm layers of {type(model).__name__} "
            f"({sum(1 for _ in named_norms(model, norms))} such layers){'' if not also else f' nor under {tuple(also)}'}"
        )
    return _summary(model)


def _norm_parameters(model: nn.Module, include: Sequence[str], norms: NormKind) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of the own parameters named in ``include`` of every ``norms`` layer."""
    _check_kind(norms)
    return [
        (f"{lname}.{pname}" if lname else pname, p)
        for lname, layer in named_norms(model, norms)
        for pname, p in layer.named_parameters(recurse=False)
        if pname in include
    ]


def _summary(model: nn.Module) -> TrainableSummary:
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    names = tuple(n for n, p in params.items() if p.requires_grad)
    return TrainableSummary(trainable, sum(p.numel() for p in params.values()), names)


def norm_parameter_count(model: nn.Module, include: Sequence[str] = ("weight", "bias"), *, norms: NormKind = "batch") -> int:
    """Number of scalars :func:`train_only_norms` with the same arguments would make trainable."""
    return sum(p.numel() for _, p in _norm_parameters(model, include, norms))


def train_random_subset(model: nn.Module, count: int, *, seed: int = 0, exclude_norms: bool = True) -> TrainableSummary:
    """Train only ``count`` randomly chosen scalars of the model (Frankle et al.'s random-parameter control).

    The scalars are drawn uniformly (without replacement) from every parameter outside the norm
    layers (``exclude_norms=True``; any norm, see :func:`~normkit.adapt._norms.is_norm`). Tensors holding
    a chosen scalar get ``requires_grad=True`` and a gradient hook that zeroes the gradient of their
    other entries. With SGD or Adam (no weight decay) the unchosen entries then stay exactly at their
    initial values; decoupled weight decay (AdamW's ``weight_decay > 0``) would still move them.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    norm_params = {id(p) for _, layer in named_norms(model, "all") for p in layer.parameters()} if exclude_norms else set()
    pool = [(n, p) for n, p in model.named_parameters() if id(p) not in norm_params]
    sizes = [p.numel() for _, p in pool]
    total = sum(sizes)
    if count > total:
        raise ValueError(f"count={count} exceeds the {total} parameters available outside the norm layers")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[:count]
    offset = 0
    names: list[str] = []
    for (name, p), size in zip(pool, sizes):
        sel = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        offset += size
        if sel.numel() == 0:
            continue
        mask = torch.zeros(size, dtype=p.dtype, device=p.device)
        mask[sel.to(p.device)] = 1
        mask = mask.reshape(p.shape)
        p.requires_grad_(True)
        p.register_hook(lambda g, m=mask: g * m)
        names.append(name)
    return TrainableSummary(count, sum(p.numel() for p in model.parameters()), tuple(names))


# --------------------------------------------------------------------------- statistics


class FrozenNormStats:
    """Handle returned by :func:`freeze_norm_stats`; ``remove()`` (or leaving the ``with`` block) unfreezes."""

    def __init__(self, layers: list[tuple[str, nn.Module]], skipped: list[str]) -> None:
        self.layers = [n for n, _ in layers]
        self.skipped = skipped
        self._modes = [(m, m.training) for _, m in layers]
        self._hooks = [m.register_forward_pre_hook(_force_eval) for _, m in layers]
        for _, m in layers:
            m.train(False)

    def remove(self, *, restore_mode: bool = True) -> None:
        """Remove the hooks; with ``restore_mode`` put each layer back in the mode it had when frozen."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if restore_mode:
            for m, mode in self._modes:
                m.train(mode)

    def __enter__(self) -> FrozenNormStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _force_eval(module: nn.Module, args: Any) -> None:
    if module.training:
        module.train(False)


def freeze_norm_stats(model: nn.Module) -> FrozenNormStats:
    """Make every batch-dependent norm normalize with its running statistics and stop updating them.

    The layers are put in eval mode and a forward pre-hook keeps them there even after
    ``model.train()`` (the usual way of fine-tuning with "frozen BN"; MobileTL's frozen global
    statistics). Their affine parameters still train (combine with :func:`train_only_norms` as you
    like). Layers without running statistics (``track_running_stats=False``) are left alone and listed
    in ``handle.skipped``: in eval mode they would still use batch statistics. Returns a handle whose
    ``remove()`` undoes it; also usable as a context manager.
    """
    layers, skipped = [], []
    for name, m in named_norms(model, "batch"):
        if getattr(m, "running_mean", None) is None and getattr(m, "running_var", None) is None and isinstance(m, _BatchNorm):
            skipped.append(name)
            continue
        layers.append((name, m))
    if not layers and not skipped:
        raise ValueError(f"freeze_norm_stats found no batch-dependent norm layer in {type(model).__name__}")
    return FrozenNormStats(layers, skipped)


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    raise TypeError(
        f"recompute_norm_stats: each batch must be a tensor, a (x, ...) tuple/list or a dict with 'x', got {type(batch).__name__}"
    )


@torch.no_grad()
def recompute_norm_stats(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate the running statistics of every batch-dependent norm from ``loader``; returns the samples seen.

    As ``torch.optim.swa_utils.update_bn``: the statistics of ``_BatchNorm`` layers are reset and
    re-accumulated with ``momentum=None`` (the cumulative average over the batches: each batch's mean
    and unbiased variance weigh equally); other batch-dependent normkit norms are reset with their
    ``reset_running_stats()`` where they have one and updated by their own rule (their momentum) in
    training mode. Only these layers run in training mode; the rest of the model stays in eval mode,
    and every mode and momentum is restored afterwards. ``loader`` yields tensors, ``(x, ...)``
    tuples or dicts with ``"x"``; ``num_batches`` stops early; ``device`` moves each batch.
    """
    layers = [m for _, m in named_norms(model, "batch")]
    if not layers:
        raise ValueError(f"recompute_norm_stats found no batch-dependent norm layer in {type(model).__name__}")
    modes = {m: m.training for m in model.modules()}
    momenta: dict[nn.Module, Any] = {}
    for m in layers:
        if isinstance(m, _BatchNorm):
            if m.running_mean is None:
                continue
            momenta[m] = m.momentum
            m.momentum = None
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    seen = 0
    try:
        model.eval()
        for m in layers:
            m.train()
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            x = _first_tensor(batch)
            if device is not None:
                x = x.to(device)
            model(x)
            seen += x.shape[0]
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise ValueError("recompute_norm_stats: the loader yielded no batch")
    return seen


# --------------------------------------------------------------------------- γ report


@dataclass(frozen=True)
class GammaReport:
    """How many norm scales γ are ≈ 0 (``|γ| < threshold``), in total and per layer."""

    threshold: float
    near_zero: int
    total: int
    per_layer: dict[str, tuple[int, int]]  # layer name -> (near zero, total)

    @property
    def fraction(self) -> float:
        return self.near_zero / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"{self.near_zero} of {self.total} γ with |γ| < {self.threshold:g} ({self.fraction:.1%})"]
        lines += [f"  {name}: {n}/{t}" for name, (n, t) in self.per_layer.items()]
        return "\n".join(lines)


def gamma_report(model: nn.Module, threshold: float = 0.01, *, norms: NormKind = "batch") -> GammaReport:
    """Count the norm scales (each norm layer's ``weight``) with ``|γ| < threshold``.

    Frankle et al. 2021 report that training only BatchNorm drives about a third of the γ of deep
    ResNets to ≈ 0 — the network learns to switch random features off. ``norms`` as in
    :func:`train_only_norms`; layers without a ``weight`` (``affine=False``) are skipped. γ is the
    effective scale ``offset + weight`` (normkit's ``weight_offset``, Gemma-style ``(1 + w)`` norms:
    :func:`normkit.nn.recognize.scale_offset`).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    _check_kind(norms)
    per: dict[str, tuple[int, int]] = {}
    for name, layer in named_norms(model, norms):
        w = getattr(layer, "weight", None)
        if isinstance(w, Tensor):
            gamma = w.detach() + scale_offset(layer)
            per[name] = (int((gamma.abs() < threshold).sum()), w.numel())
    return GammaReport(threshold, sum(n for n, _ in per.values()), sum(t for _, t in per.values()), per)
