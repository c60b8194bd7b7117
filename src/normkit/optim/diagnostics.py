"""Training diagnostics for normalized networks: weight norms, effective learning rates, angular updates.

Why: for a weight ``w`` feeding a normalization layer the loss is scale-invariant, so what an
optimizer step does to the *function* is its rotation of ``w``, not its length. Two numbers say
how fast such a weight learns (van Laarhoven 2017, arXiv:1706.05350; Hoffer et al. 2018,
arXiv:1803.01814; Lyle et al. 2024, arXiv:2407.01800):

* the **effective learning rate** ``η_eff = η / ‖w‖²`` (SGD on a scale-invariant weight moves its
  direction as plain SGD with ``η_eff`` on the unit sphere would), and
* the **measured angular update** ``θ_t = arccos(⟨w_t, w_{t+1}⟩ / (‖w_t‖ ‖w_{t+1}‖))``, what a
  step actually did, whichever optimizer made it.

A growing ``‖w‖`` (no weight decay, Adam) shows up as a falling ``η_eff`` and ``θ_t``; NaP and
AdamP hold them. :class:`NormDiagnostics` records these per parameter and per parameter group,
plus each parameter's gradient norm, the fraction of each norm layer's gains ``γ`` near zero
(collapsed channels), and each norm layer's output statistics, through optimizer step hooks and
forward hooks, so the training loop does not change.

``effective_lr`` is only meaningful for scale-invariant weights: pass them (``scale_invariant=``,
e.g. :func:`normkit.optim.scale_invariant_params`) or an ``example_input`` to find them by tracing;
for other parameters the field is ``None``. The angular update is recorded for every parameter.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normkit.optim.nap import is_norm_layer

__all__ = ["NormDiagnostics", "angular_update", "effective_lr", "grad_norms_by_layer", "plot_diagnostics"]


def effective_lr(lr: float, weight: Tensor) -> float:
    """``lr / ‖w‖²`` (Frobenius norm): the step size on the unit sphere of a scale-invariant weight."""
    n2 = float(weight.detach().double().pow(2).sum())
    return lr / n2 if n2 > 0 else math.inf


def angular_update(before: Tensor, after: Tensor) -> float:
    """Angle in radians between two values of one weight (``arccos`` of their cosine, clamped to [−1, 1])."""
    a, b = before.detach().double().flatten(), after.detach().double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return math.acos(max(-1.0, min(1.0, float(a @ b) / (na * nb))))


def grad_norms_by_layer(model: nn.Module, kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)) -> dict[str, float]:
    """``‖∂L/∂W‖`` of every ``Linear``/``Conv2d`` weight with a gradient, in module order (after ``backward``)."""
    return {
        name: float(m.weight.grad.detach().double().norm())
        for name, m in model.named_modules()
        if isinstance(m, kinds) and getattr(m, "weight", None) is not None and m.weight.grad is not None
    }


class NormDiagnostics:
    """Record norm-related training statistics through ``optimizer`` step hooks and norm-layer forward hooks.

    Args:
        model: the model being trained.
        optimizer: its optimizer; statistics are taken around every ``every``-th ``step()``.
        scale_invariant: the scale-invariant weights (their ``effective_lr`` is recorded).
        example_input: instead of ``scale_invariant``, one batch to find them with
            :func:`normkit.optim.find_scale_invariant` (one traced forward plus one per candidate).
        every: record every ``every``-th optimizer step (1: all).
        gamma_threshold: a norm gain counts as near zero when ``|γ| < gamma_threshold``.

    Use ``with NormDiagnostics(...) as diag:`` or call :meth:`close` to remove the hooks.
    :meth:`to_rows` gives flat dicts (``kind`` = ``"param"``, ``"group"`` or ``"norm"``),
    :meth:`summary` the first and last values per parameter, and :func:`plot_diagnostics` a figure.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scale_invariant: Iterable[Tensor] | None = None,
        example_input: Any = None,
        every: int = 1,
        gamma_threshold: float = 1e-2,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NormDiagnostics expects an nn.Module, got {type(model).__name__}")
        if not all(hasattr(optimizer, a) for a in ("param_groups", "register_step_pre_hook", "register_step_post_hook")):
            raise TypeError(
                "NormDiagnostics expects a torch.optim.Optimizer (or a wrapper with param_groups and step hooks, "
                f"such as NaP), got {type(optimizer).__name__}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not (isinstance(gamma_threshold, int | float) and gamma_threshold > 0):
            raise ValueError(f"gamma_threshold must be a number > 0, got {gamma_threshold!r}")
        if scale_invariant is not None and example_input is not None:
            raise ValueError("give scale_invariant or example_input, not both")
        self.model, self.optimizer, self.every, self.gamma_threshold = model, optimizer, every, float(gamma_threshold)
        self.names = {id(p): n for n, p in model.named_parameters()}
        if example_input is not None:
            from normkit.optim.scale_invariant import scale_invariant_params

            scale_invariant = scale_invariant_params(model, example_input)
        self.scale_invariant = {id(p) for p in (scale_invariant or ())}
        unknown = self.scale_invariant - set(self.names)
        if unknown:
            raise ValueError(f"{len(unknown)} scale_invariant tensors are not parameters of the model")
        self.norm_layers = {n: m for n, m in model.named_modules() if is_norm_layer(m)}
        self.rows: list[dict[str, Any]] = []
        self.steps = 0
        self._before: dict[int, Tensor] = {}
        self._grads: dict[int, float] = {}
        self._acts: dict[str, tuple[float, float]] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            *(m.register_forward_hook(self._act_hook(n)) for n, m in self.norm_layers.items()),
        ]

    # -- hooks ---------------------------------------------------------------------------------
    def _act_hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if module.training and isinstance(out, Tensor) and out.numel() > 1 and self._recording_next():
                o = out.detach().float()
                self._acts[name] = (float(o.mean()), float(o.std()))

        return hook

    def _recording_next(self) -> bool:
        return self.steps % self.every == 0

    def _tracked(self) -> list[tuple[int, dict[str, Any], nn.Parameter]]:
        return [(gi, g, p) for gi, g in enumerate(self.optimizer.param_groups) for p in g["params"] if id(p) in self.names]

    @torch.no_grad()
    def _pre_step(self, *_: Any) -> None:
        if not self._recording_next():
            return
        self._before = {id(p): p.detach().clone() for _, _, p in self._tracked()}
        self._grads = {id(p): float(p.grad.detach().double().norm()) for _, _, p in self._tracked() if p.grad is not None}

    @torch.no_grad()
    def _post_step(self, *_: Any) -> None:
        step = self.steps
        self.steps += 1
        if step % self.every != 0:
            return
        groups: dict[int, dict[str, Any]] = {}
        for gi, g, p in self._tracked():
            lr = float(g["lr"])
            w2 = float(p.detach().double().pow(2).sum())
            grad = self._grads.get(id(p))
            before = self._before.get(id(p))
            inv = id(p) in self.scale_invariant
            self.rows.append({
                "kind": "param", "step": step, "name": self.names[id(p)], "group": gi, "lr": lr,
                "weight_norm": math.sqrt(w2), "grad_norm": grad, "scale_invariant": inv,
                "effective_lr": (lr / w2 if w2 > 0 else math.inf) if inv else None,
                "angular_update": angular_update(before, p) if before is not None else None,
            })  # fmt: skip
            acc = groups.setdefault(gi, {"w2": 0.0, "g2": 0.0, "n": 0, "lr": lr})
            acc["w2"] += w2
            acc["g2"] += (grad or 0.0) ** 2
            acc["n"] += 1
        for gi, acc in groups.items():
            self.rows.append({
                "kind": "group", "step": step, "name": f"group{gi}", "group": gi, "lr": acc["lr"], "params": acc["n"],
                "weight_norm": math.sqrt(acc["w2"]), "grad_norm": math.sqrt(acc["g2"]),
            })  # fmt: skip
        for name, m in self.norm_layers.items():
            gamma = getattr(m, "weight", None)
            row: dict[str, Any] = {"kind": "norm", "step": step, "name": name}
            if isinstance(gamma, Tensor) and gamma.numel() > 0:
                row["gamma_near_zero"] = float((gamma.detach().abs() < self.gamma_threshold).float().mean())
            if name in self._acts:
                row["act_mean"], row["act_std"] = self._acts[name]
            self.rows.append(row)
        self._before, self._grads, self._acts = {}, {}, {}

    # -- results ------------------------------------------------------------------------------
    def to_rows(self) -> list[dict[str, Any]]:
        """All recorded rows (copies), in recording order."""
        return [dict(r) for r in self.rows]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per parameter: weight norm and effective lr at the first and last record, mean angular update, last grad norm."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            if r["kind"] != "param":
                continue
            s = out.setdefault(
                r["name"], {"first_weight_norm": r["weight_norm"], "first_effective_lr": r["effective_lr"], "_ang": []}
            )
            s["last_weight_norm"], s["last_effective_lr"], s["last_grad_norm"] = (
                r["weight_norm"],
                r["effective_lr"],
                r["grad_norm"],
            )
            if r["angular_update"] is not None and not math.isnan(r["angular_update"]):
                s["_ang"].append(r["angular_update"])
        for s in out.values():
            ang = s.pop("_ang")
            s["mean_angular_update"] = statistics.fmean(ang) if ang else None
        return out

    def close(self) -> None:
        """Remove every hook (recorded rows are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> NormDiagnostics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_diagnostics(
    rows: Sequence[Mapping[str, Any]] | NormDiagnostics,
    path: str | Path | None = None,
    *,
    names: Sequence[str] | None = None,
) -> Any:
    """Four panels over steps (weight norm, effective lr, angular update, gradient norm), one line per parameter.

    Needs matplotlib (an optional dependency: ``pip install matplotlib``). ``names`` limits the
    lines (default: every scale-invariant parameter, else every parameter). Returns the figure;
    with ``path`` it is also saved there.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_diagnostics needs matplotlib: pip install matplotlib") from e
    data = rows.to_rows() if isinstance(rows, NormDiagnostics) else [dict(r) for r in rows]
    params = [r for r in data if r.get("kind") == "param"]
    if names is None:
        inv = sorted({r["name"] for r in params if r.get("scale_invariant")})
        names = inv or sorted({r["name"] for r in params})
    fields = [
        ("weight_norm", "‖w‖"),
        ("effective_lr", "lr / ‖w‖²"),
        ("angular_update", "angular update (rad)"),
        ("grad_norm", "‖∇w‖"),
    ]
    fig = Figure(figsize=(16, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    for ax, (field, label) in zip(axes, fields):
        for name in names:
            pts = [(r["step"], r[field]) for r in params if r["name"] == name and r.get(field) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_title(label)
        if field in ("effective_lr", "grad_norm"):
            ax.set_yscale("log")
    if names and len(names) <= 12:
        axes[0].legend(fontsize=6)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
