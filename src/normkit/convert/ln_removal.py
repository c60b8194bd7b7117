"""LayerNorm removal by fine-tuning: :class:`FakeLayerNorm`, :func:`remove_layernorm`, :func:`export_layernorm_free`.

Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim, "Transformers Don't Need LayerNorm at Inference
Time: Scaling LayerNorm Removal to GPT-2 XL and the Implications for Mechanistic Interpretability",
2025, arXiv:2507.02559. Official code: ``submarat/removing-layer-norm`` (``train.py``: ``FakeLayerNorm``,
``replace_layernorm_with_fake_layernorm``, ``LNRemover``; ``config.py``: the schedules;
``utils.py::remove_layernorm_by_scaling``: the export), read at commit 583a9e6.

Why. A LayerNorm ``LN(x) = (x − μ(x)) / σ(x) · w + b`` is linear except for the division by the
per-token ``σ(x) = sqrt(var_d(x) + eps)``. Replacing ``σ(x)`` by a *constant* makes the model's
residual stream linear in every norm, which is what interpretability methods (direct logit
attribution) want. Done all at once it breaks the model; done one norm at a time during a short
fine-tune, the model adapts and the loss barely moves (paper: GPT-2 small +0.067 CE vs a vanilla
fine-tune on OpenWebText, XL +0.025).

:class:`FakeLayerNorm` (drop-in for ``nn.LayerNorm``, same ``weight``/``bias``) has two modes:

* **real**: ``F.layer_norm(x, eps)``; in training it also keeps the running estimate of the average
  per-token std, ``σ_avg ← m·σ_avg + (1 − m)·mean_{batch,pos} sqrt(var_d(x) + eps)`` with ``m = 0.9``
  (the official ``config.py`` default; the first training batch initialises it, where the official
  code starts from std values precomputed on one OpenWebText sample, ``std_dicts.py``);
* **fake**: ``(x − mean_d(x)) / s · w + b`` with the frozen scalar ``s = σ_avg`` (centring stays: it
  is linear). ``s`` follows ``σ_avg`` while any path of the norm is real and is frozen when the last
  one goes fake (the official ``EXP_RECOMPUTE_STD_ON_REAL`` behaviour, the one the paper describes:
  "computed before removing an LN block and then frozen").

GPT-2's ``ln_1`` feeds Q, K and V through one ``c_attn``; the official code removes it in two steps,
first for the Q/K path, later for the V path. Here the block's ``attn.c_attn`` gets a forward hook
that recomputes the V third of its output from ``ln_1``'s V-path output while the two paths differ
(the model's classes and state-dict keys are unchanged; the official code monkey-patches the
attention and block forwards instead).

**Schedule** (:func:`removal_schedule`, the official ``make_gpt2_standard``): after ``start = 20``
steps, ``ln_2`` of layer ``i`` at step ``start + 2i``, then ``ln_1`` Q/K of layer ``i`` every 2 steps,
then ``ln_1`` V every 3 steps, then ``ln_f``; with ``special_first_position=True`` (the official
``bos_special_treatment``/``EXP_CORRECT_BOS`` option, off in its default schedule) position 0 keeps
its own std until a final ``first_position`` step 12 steps after ``ln_f``. Each event is applied
before the optimizer step of its index (the official ``on_step_begin``). Official fine-tune: AdamW,
lr 6e-4 cosine to 3e-4, weight decay 0.01, warmup 20, grad-norm clip 1.0, 300 steps for GPT-2 small.

**Export** (:func:`export_layernorm_free`, the official ``remove_layernorm_by_scaling``): every
fake norm becomes a plain ``nn.LayerNorm`` with ``weight ← weight · 1e6 / s`` and ``eps = 1e12``, and
``config.layer_norm_epsilon = 1e12``, so a stock ``GPT2LMHeadModel`` (saved, loaded, served by any
tool) computes ``(x − μ) / sqrt(var + 1e12) · w·1e6/s + b ≈ (x − μ)/s · w + b``: the relative error
``var/2e12`` is below fp32 rounding for any realistic residual stream.

Divergences from the official code, each named:

* the running std is updated by training forwards only (official: every forward, also evaluation),
  so evaluating a model never changes it;
* the initial ``σ_avg`` is the first training batch's (official: precomputed ``std_dicts``);
* ``FakeLayerNorm`` without a bias computes ``(x − μ)/s · w`` (the official fake branch returns
  ``x · w`` when there is no bias); GPT-2 always has one;
* the EOT-token std of the V path (official ``eot_mask``, ``disable_eot_std``) is not implemented: in
  the official default configuration it equals the average std (``bos_special_treatment`` is never
  enabled by ``train.py``), so the step changes nothing there;
* the auxiliary uniform-norm loss (``aux_loss_weight``, 0 by default) is not implemented.

Supported models: HF ``GPT2LMHeadModel``/``GPT2Model`` and anything with the same structure
(``transformer.h[i].ln_1/ln_2/attn.c_attn``, ``transformer.ln_f``); others get a ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.nn.replace import ReplaceReport, replace_modules

__all__ = [
    "EXPORT_EPS",
    "EXPORT_SCALE",
    "FakeLayerNorm",
    "LNRemovalResult",
    "RemovalEvent",
    "apply_removal_event",
    "export_layernorm_free",
    "finetune_lm",
    "lm_loss",
    "remove_layernorm",
    "removal_schedule",
    "to_fake_layernorm",
]

#: ``eps`` of the exported LayerNorms (official ``remove_layernorm_by_scaling``).
EXPORT_EPS = 1e12
#: ``sqrt(EXPORT_EPS)``: the factor the exported weights are multiplied by.
EXPORT_SCALE = 1e6

TARGETS = ("ln_2", "ln_1_qk", "ln_1_v", "ln_f", "first_position")


class FakeLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim that can switch to a frozen std (see the module docstring).

    Buffers: ``running_std`` (the ``σ_avg`` estimate; NaN until the first training forward),
    ``std`` (the value fake mode divides by), ``running_std_first``/``std_first`` (position 0, used
    when ``special_first_position``), ``is_fake`` (the main, or Q/K, path), ``v_is_fake`` (GPT-2
    ``ln_1``'s V path) and ``first_special``.

    Args:
        normalized_shape: the feature size (one trailing dim, as GPT-2's norms).
        eps: LayerNorm's eps, also inside the running std (official: 1e-5 for both).
        momentum: weight of the old value in the running std (official config: 0.9).
        special_first_position: keep a separate std for position 0 (dim −2) until the schedule's
            ``first_position`` step (official ``bos_special_treatment``; off by default there).
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        momentum: float = 0.9,
        special_first_position: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(normalized_shape, bool) or not isinstance(normalized_shape, int):
            raise TypeError(
                f"FakeLayerNorm normalizes one trailing dim: normalized_shape must be an int, got {normalized_shape!r}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.momentum = float(momentum)
        nan = torch.tensor(float("nan"), device=device)
        self.register_buffer("running_std", nan.clone())
        self.register_buffer("std", nan.clone())
        self.register_buffer("running_std_first", nan.clone())
        self.register_buffer("std_first", nan.clone())
        self.register_buffer("is_fake", torch.tensor(False, device=device))
        self.register_buffer("v_is_fake", torch.tensor(False, device=device))
        self.register_buffer("first_special", torch.tensor(bool(special_first_position), device=device))
        self._v_split = False  # set by to_fake_layernorm on GPT-2 ln_1 (a c_attn hook reads _v_out)
        self._v_out: Tensor | None = None

    @property
    def fully_fake(self) -> bool:
        """Both paths fake (for a norm without a V path, ``v_is_fake`` follows ``is_fake``)."""
        return bool(self.is_fake) and bool(self.v_is_fake)

    @torch.no_grad()
    def _track(self, x: Tensor) -> None:
        sd = (x.float().var(dim=-1, unbiased=False) + self.eps).sqrt()  # (..., T)
        for run, std, value in (
            (self.running_std, self.std, sd.mean()),
            (self.running_std_first, self.std_first, sd[..., 0].mean() if sd.dim() >= 2 else sd.mean()),
        ):
            if torch.isnan(run):
                run.copy_(value)
            else:
                run.mul_(self.momentum).add_(value, alpha=1.0 - self.momentum)
            std.copy_(run)

    def _fake(self, x: Tensor) -> Tensor:
        if torch.isnan(self.std):
            raise RuntimeError(
                "FakeLayerNorm is fake but has no std: it saw no training forward before going fake "
                "(run a training batch first, or call set_fake(..., std=value))"
            )
        s = self.std.to(x.dtype)
        if bool(self.first_special) and x.dim() >= 2:
            s = s.expand(x.shape[-2]).clone()
            s[0] = self.std_first.to(x.dtype)
            s = s[:, None]
        y = (x - x.mean(dim=-1, keepdim=True)) / s
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def _real(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(f"FakeLayerNorm expects a last dim of {self.normalized_shape[0]}, got shape {tuple(x.shape)}")
        if self.training and not self.fully_fake:
            self._track(x)
        qk_fake = bool(self.is_fake)
        y = self._fake(x) if qk_fake else self._real(x)
        if self._v_split and bool(self.v_is_fake) != qk_fake:
            self._v_out = self._fake(x) if bool(self.v_is_fake) else self._real(x)
        else:
            self._v_out = None
        return y

    @torch.no_grad()
    def set_fake(self, path: str = "all", std: float | None = None) -> None:
        """Make ``path`` (``"all"``, ``"qk"`` or ``"v"``) fake; ``std`` overrides the estimate."""
        if path not in ("all", "qk", "v"):
            raise ValueError(f"path must be 'all', 'qk' or 'v', got {path!r}")
        if std is not None:
            if not std > 0:
                raise ValueError(f"std must be positive, got {std}")
            for t in (self.running_std, self.std, self.running_std_first, self.std_first):
                t.fill_(std)
        if path in ("all", "qk"):
            self.is_fake.fill_(True)
        if path in ("all", "v") or not self._v_split:
            self.v_is_fake.fill_(True)

    @torch.no_grad()
    def disable_first_position(self) -> None:
        """Position 0 uses the average std from now on (official ``disable_bos_special_treatment``)."""
        self.first_special.fill_(False)

    def extra_repr(self) -> str:
        mode = (
            "fake"
            if self.fully_fake
            else ("qk fake" if bool(self.is_fake) else ("v fake" if bool(self.v_is_fake) and self._v_split else "real"))
        )
        return f"{super().extra_repr()}, mode={mode}, std={float(self.std):.4g}, momentum={self.momentum}"


class _VPathHook:
    """Forward hook on GPT-2 ``attn.c_attn``: the V third from ``ln_1``'s V-path output.

    A class (not a closure) so that ``copy.deepcopy`` of the model points the copy's hook at the
    copy's ``ln_1``.
    """

    def __init__(self, norm: FakeLayerNorm) -> None:
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        xv, self.norm._v_out = self.norm._v_out, None
        if xv is None:
            return None
        c = output.shape[-1] // 3
        if isinstance(module, nn.Linear):  # weight (3C, C)
            v = F.linear(xv, module.weight[2 * c :], None if module.bias is None else module.bias[2 * c :])
        else:  # transformers' Conv1D: weight (C, 3C), y = x @ W + b
            v = xv @ module.weight[:, 2 * c :]
            if module.bias is not None:
                v = v + module.bias[2 * c :]
        return torch.cat([output[..., : 2 * c], v], dim=-1)


@dataclass(frozen=True)
class _Gpt2:
    body: nn.Module  # the module holding h and ln_f
    prefix: str  # its qualified name in the model ("transformer." or "")


def _gpt2(model: nn.Module) -> _Gpt2:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module (a GPT-2), got {type(model).__name__}")
    for body, prefix in ((getattr(model, "transformer", None), "transformer."), (model, "")):
        if (
            isinstance(body, nn.Module)
            and isinstance(getattr(body, "h", None), nn.ModuleList)
            and isinstance(getattr(body, "ln_f", None), nn.Module)
            and len(body.h) > 0
            and all(
                all(isinstance(getattr(b, n, None), nn.Module) for n in ("ln_1", "ln_2", "attn"))
                and isinstance(getattr(b.attn, "c_attn", None), nn.Module)
                for b in body.h
            )
        ):
            return _Gpt2(body, prefix)
    raise TypeError(
        f"LayerNorm removal supports GPT-2-structured models (transformer.h[i].ln_1/ln_2/attn.c_attn and "
        f"transformer.ln_f, e.g. transformers' GPT2LMHeadModel), got {type(model).__name__}"
    )


def _fake_norms(model: nn.Module) -> dict[str, FakeLayerNorm]:
    g = _gpt2(model)
    out: dict[str, FakeLayerNorm] = {}
    for i, b in enumerate(g.body.h):
        out[f"ln_1.{i}"], out[f"ln_2.{i}"] = b.ln_1, b.ln_2
    out["ln_f"] = g.body.ln_f
    bad = [k for k, m in out.items() if not isinstance(m, FakeLayerNorm)]
    if bad:
        raise TypeError(f"the model's norms are not FakeLayerNorm yet ({', '.join(bad[:4])}, ...): call to_fake_layernorm first")
    return out


def to_fake_layernorm(
    model: nn.Module, *, momentum: float = 0.9, special_first_position: bool = False, inplace: bool = True
) -> ReplaceReport:
    """Replace GPT-2's ``ln_1``, ``ln_2`` and ``ln_f`` by :class:`FakeLayerNorm` (real mode, same affine).

    Identical outputs until a norm goes fake. Returns :func:`normkit.nn.replace.replace_modules`'s
    report (converted model as ``.model``).
    """
    g = _gpt2(model)
    wanted = {f"{g.prefix}ln_f"} | {f"{g.prefix}h.{i}.{n}" for i in range(len(g.body.h)) for n in ("ln_1", "ln_2")}
    for name in sorted(wanted):
        m = model.get_submodule(name)
        if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
            raise TypeError(f"{name} must be an nn.LayerNorm over one dim, got {type(m).__name__}")

    def build(name: str, old: nn.Module) -> nn.Module:
        new = FakeLayerNorm(
            old.normalized_shape[0],
            old.eps,
            old.elementwise_affine,
            old.bias is not None,
            momentum=momentum,
            special_first_position=special_first_position,
            device=old.weight.device if old.weight is not None else None,
            dtype=old.weight.dtype if old.weight is not None else None,
        )
        with torch.no_grad():
            if old.weight is not None:
                new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        return new

    report = replace_modules(model, lambda n, m: n in wanted and type(m) is not FakeLayerNorm, build, inplace=inplace)
    body = _gpt2(report.model).body
    for b in body.h:
        b.ln_1._v_split = True
        c_attn = b.attn.c_attn
        if not any(isinstance(h, _VPathHook) for h in c_attn._forward_hooks.values()):
            c_attn.register_forward_hook(_VPathHook(b.ln_1))
    return report


@dataclass(frozen=True)
class RemovalEvent:
    """Make ``target`` fake at the start of optimizer step ``step`` (``layer`` None: ``ln_f``/all)."""

    step: int
    target: str  # one of TARGETS
    layer: int | None = None


def removal_schedule(
    n_layers: int,
    *,
    start: int = 20,
    gap_ln2: int = 2,
    gap_ln1qk: int = 2,
    gap_ln1v: int = 3,
    special_first_position: bool = False,
    first_position_delay: int = 12,
) -> list[RemovalEvent]:
    """The official removal order (``config.py::make_gpt2_standard``), sorted by step.

    ``ln_2`` of layer i at ``start + i·gap_ln2``; ``ln_1`` Q/K from ``start + L·gap_ln2``, one layer
    every ``gap_ln1qk``; ``ln_1`` V from there + ``L·gap_ln1qk``, every ``gap_ln1v``; ``ln_f`` after the
    last V step window (``+ L·gap_ln1v``); ``first_position`` ``first_position_delay`` steps after
    ``ln_f`` (official ``start_bos = start_lnf + 2 + 10``). A gap of 0 removes all layers at once.
    """
    for name, v, lo in (("n_layers", n_layers, 1), ("start", start, 0), ("gap_ln2", gap_ln2, 0),
                        ("gap_ln1qk", gap_ln1qk, 0), ("gap_ln1v", gap_ln1v, 0),
                        ("first_position_delay", first_position_delay, 0)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    events: list[RemovalEvent] = []
    s = start
    for target, gap in (("ln_2", gap_ln2), ("ln_1_qk", gap_ln1qk), ("ln_1_v", gap_ln1v)):
        events += [RemovalEvent(s + i * gap, target, i) for i in range(n_layers)]
        s += n_layers * gap
    events.append(RemovalEvent(s, "ln_f"))
    if special_first_position:
        events.append(RemovalEvent(s + first_position_delay, "first_position"))
    return sorted(events, key=lambda e: e.step)


def apply_removal_event(model: nn.Module, event: RemovalEvent) -> None:
    """Apply one schedule event to a model converted by :func:`to_fake_layernorm`."""
    norms = _fake_norms(model)
    n_layers = len(_gpt2(model).body.h)
    if event.target not in TARGETS:
        raise ValueError(f"event target must be one of {TARGETS}, got {event.target!r}")
    if event.target in ("ln_2", "ln_1_qk", "ln_1_v") and not (isinstance(event.layer, int) and 0 <= event.layer < n_layers):
        raise ValueError(f"{event.target} needs a layer in [0, {n_layers}), got {event.layer!r}")
    if event.target == "ln_2":
        norms[f"ln_2.{event.layer}"].set_fake("all")
    elif event.target == "ln_1_qk":
        norms[f"ln_1.{event.layer}"].set_fake("qk")
    elif event.target == "ln_1_v":
        norms[f"ln_1.{event.layer}"].set_fake("v")
    elif event.target == "ln_f":
        norms["ln_f"].set_fake("all")
    else:
        for m in norms.values():
            m.disable_first_position()


def _default_loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    inputs, targets = batch[0], batch[1]
    out = model(inputs)
    logits = out if isinstance(out, Tensor) else out.logits
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """transformers' ``cosine_with_min_lr``: linear warmup, then cosine from 1 to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def finetune_lm(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    *,
    steps: int,
    lr: float = 6e-4,
    min_lr: float = 3e-4,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    schedule: Sequence[RemovalEvent] = (),
    loss_fn: Callable[[nn.Module, Sequence[Tensor]], Tensor] | None = None,
) -> list[float]:
    """Fine-tune ``model`` for ``steps`` AdamW steps (the official hyper-parameters as defaults).

    ``batches`` yields ``(inputs, targets)`` (e.g. :func:`normkit.data.text.lm_batches`); the loss is
    the cross-entropy of ``model(inputs).logits`` against ``targets`` unless ``loss_fn(model, batch)``
    is given. ``schedule`` events are applied before the step of their index. Returns the losses.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    late = [e for e in schedule if e.step >= steps]
    if late:
        raise ValueError(
            f"the schedule has events at step {late[0].step} and later, but steps={steps}: "
            f"give steps > {max(e.step for e in schedule)}"
        )
    loss_fn = loss_fn or _default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup_steps, min_lr / lr))
    by_step: dict[int, list[RemovalEvent]] = {}
    for e in schedule:
        by_step.setdefault(e.step, []).append(e)
    model.train()
    losses: list[float] = []
    it = iter(batches)
    for step in range(steps):
        for e in by_step.get(step, ()):
            apply_removal_event(model, e)
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} of {steps} steps") from None
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def lm_loss(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    loss_fn: Callable[[nn.Module, Sequence[Tensor]], Tensor] | None = None,
) -> float:
    """Mean loss over ``batches`` in eval mode (train/eval mode restored), weighted by target count."""
    loss_fn = loss_fn or _default_loss
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            n = int((batch[1] != -100).sum())
            total += float(loss_fn(model, batch)) * n
            count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("lm_loss got no batches (or only ignored targets)")
    return total / count


@dataclass
class LNRemovalResult:
    """What :func:`remove_layernorm` did: the FakeLayerNorm model (all fake), its losses, the schedule."""

    model: nn.Module
    losses: list[float]
    schedule: list[RemovalEvent] = field(default_factory=list)


def remove_layernorm(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    *,
    steps: int,
    schedule: Sequence[RemovalEvent] | None = None,
    momentum: float = 0.9,
    special_first_position: bool = False,
    inplace: bool = False,
    **train_kwargs: Any,
) -> LNRemovalResult:
    """Fine-tune a GPT-2 while removing its LayerNorms one by one (the paper's procedure).

    Converts with :func:`to_fake_layernorm`, then :func:`finetune_lm` with ``schedule`` (default:
    :func:`removal_schedule` for the model's depth; ``steps`` must exceed its last event, the official
    GPT-2 small run trains 300 steps for a schedule ending at 104). ``train_kwargs`` go to
    :func:`finetune_lm` (``lr``, ``warmup_steps``, ``loss_fn``, ...). The result's model has every norm
    fake; :func:`export_layernorm_free` turns it into a stock model.
    """
    report = to_fake_layernorm(model, momentum=momentum, special_first_position=special_first_position, inplace=inplace)
    model = report.model
    n_layers = len(_gpt2(model).body.h)
    if schedule is None:
        schedule = removal_schedule(n_layers, special_first_position=special_first_position)
    schedule = sorted(schedule, key=lambda e: e.step)
    losses = finetune_lm(model, batches, steps=steps, schedule=schedule, **train_kwargs)
    return LNRemovalResult(model, losses, list(schedule))


def export_layernorm_free(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A stock model whose LayerNorms are linear: ``weight ← weight·1e6/s``, ``eps = 1e12``.

    Every :class:`FakeLayerNorm` must be fully fake with position 0 no longer special (else a
    ``ValueError`` lists the ones that are not); the V-path hooks are removed and
    ``config.layer_norm_epsilon`` set to 1e12, so ``save_pretrained``/``from_pretrained`` round-trip.
    Outputs equal the fake model's to fp32 rounding.
    """
    norms = _fake_norms(model)
    not_done = [k for k, m in norms.items() if not m.fully_fake or bool(m.first_special)]
    if not_done:
        raise ValueError(
            "export needs every LayerNorm removed (fully fake, position 0 not special); "
            f"still real or special: {', '.join(not_done)}"
        )

    def build(name: str, old: nn.Module) -> nn.Module:
        new = nn.LayerNorm(
            old.normalized_shape, eps=EXPORT_EPS, elementwise_affine=old.elementwise_affine, bias=old.bias is not None,
            device=old.std.device, dtype=old.weight.dtype if old.weight is not None else None,
        )  # fmt: skip
        if old.weight is None:
            raise ValueError(f"{name}: export scales the LayerNorm weight, but this norm has none")
        with torch.no_grad():
            new.weight.copy_(old.weight * (EXPORT_SCALE / old.std.to(old.weight.dtype)))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        return new

    report = replace_modules(model, lambda n, m: isinstance(m, FakeLayerNorm), build, inplace=inplace)
    out = report.model
    for b in _gpt2(out).body.h:
        hooks = b.attn.c_attn._forward_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, _VPathHook)]:
            del hooks[key]
    config = getattr(out, "config", None)
    if config is not None and hasattr(config, "layer_norm_epsilon"):
        config.layer_norm_epsilon = EXPORT_EPS
    return out
