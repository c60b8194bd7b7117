"""Swap the normalization layers of any model for normkit's: :func:`replace_norms`.

Recognition is by behaviour, not by a list of classes:

* torch's ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` (and
  subclasses) map to normkit's class of the same name with the same arguments;
* a third-party module whose class name ends in ``RMSNorm`` or ``LayerNorm`` and that has a
  ``weight`` parameter and an ``eps`` or ``variance_epsilon`` attribute (every transformers
  RMSNorm: Llama, Mistral, Qwen2/3, Gemma, ...) is tried against ``normkit.RMSNorm`` (scale ``w``
  and Gemma's ``1 + w``) and ``normkit.LayerNorm``, with its stored weight copied as is.

Every mapping is checked numerically when it is made: the old and the new module (copies, in eval
mode, float32 — float64 for a float64 module) run on one fixed random input, once with their own
parameters and once with the same random parameters in both, and must agree to float32's default
tolerance (``torch.testing.assert_close``). A module no candidate reproduces is left in place and
reported as not converted, with the reason. Normkit's own modules are never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from normkit.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, RMSNorm
from normkit.nn.replace import replace_modules
from normkit.registry import create_norm, list_norms, norm_info

__all__ = ["NormReplacement", "NormReport", "recognise_norm", "replace_norms"]

#: float32's default tolerances of ``torch.testing.assert_close``, used for every check
RTOL, ATOL = 1.3e-6, 1e-5

Where = Callable[[str, nn.Module], bool]


class NormReplacement(NamedTuple):
    """One recognised norm: where, what it was, what it became (``None``: left in place), and why."""

    name: str
    old: str
    new: str | None
    exact: bool
    note: str


class NormReport(list):
    """A list of :class:`NormReplacement`, in ``named_modules`` order, plus the converted ``model``.

    A module registered at several places is listed at each of them. ``converted`` and
    ``not_converted`` split the list; ``all_exact`` says whether every listed norm was replaced
    by an exact equivalent.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def converted(self) -> list[NormReplacement]:
        return [r for r in self if r.new is not None]

    @property
    def not_converted(self) -> list[NormReplacement]:
        return [r for r in self if r.new is None]

    @property
    def all_exact(self) -> bool:
        return all(r.exact for r in self)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} of {len(self)} norms replaced"]
        for r in self:
            status = "exact" if r.exact else ("not exact" if r.new else "kept")
            lines.append(f"  {r.name or '<root>'}: {r.old} -> {r.new or '-'} ({status}{': ' + r.note if r.note else ''})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- recognition

_TORCH_BN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_BN_SAMPLE = {nn.BatchNorm1d: (3,), nn.BatchNorm2d: (3, 3), nn.BatchNorm3d: (2, 2, 2)}


def _is_normkit(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "normkit"


def _hf_eps(m: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def recognise_norm(m: nn.Module) -> str | None:
    """The kind of norm ``m`` is (``"layernorm"``, ``"rmsnorm"``, ``"groupnorm"``, ``"batchnorm"``,
    ``"third_party"``), or ``None`` for anything else, normkit's own modules included.

    ``"third_party"`` is a candidate only: :func:`replace_norms` converts it after the numerical check.
    """
    if _is_normkit(m):
        return None
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.RMSNorm):
        return "rmsnorm"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    if isinstance(m, tuple(_TORCH_BN)):
        return "batchnorm"
    name = type(m).__name__
    weight = getattr(m, "weight", None)
    if (name.endswith(("RMSNorm", "LayerNorm")) and isinstance(weight, nn.Parameter) and weight.dim() >= 1
            and _hf_eps(m) is not None):
        return "third_party"
    return None


def _torch_bn_class(m: nn.Module) -> type[nn.Module]:
    return next(c for c in _TORCH_BN if isinstance(m, c))


def _sample_shape(m: nn.Module, kind: str) -> tuple[int, ...]:
    if kind in ("layernorm", "rmsnorm"):
        return (2, 3, *m.normalized_shape)
    if kind == "groupnorm":
        return (2, m.num_channels, 3, 3)
    if kind == "batchnorm":
        return (2, m.num_features, *_BN_SAMPLE[_torch_bn_class(m)])
    return (2, 3, *m.weight.shape)


def _num_features(m: nn.Module, kind: str) -> int | tuple[int, ...]:
    if kind in ("layernorm", "rmsnorm"):
        shape = tuple(m.normalized_shape)
    elif kind == "groupnorm":
        return m.num_channels
    elif kind == "batchnorm":
        return m.num_features
    else:
        shape = tuple(m.weight.shape)
    return shape[0] if len(shape) == 1 else shape


def _exact_candidates(m: nn.Module, kind: str, kwargs: dict[str, Any]) -> list[Callable[[], nn.Module]]:
    """Builders of the normkit modules that may reproduce ``m`` exactly, most likely first."""
    if kind == "layernorm":
        return [lambda: LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None, **kwargs)]
    if kind == "rmsnorm":
        return [lambda: RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, **kwargs)]
    if kind == "groupnorm":
        return [lambda: GroupNorm(m.num_channels, m.num_groups, m.eps, m.affine, **kwargs)]
    if kind == "batchnorm":
        cls = _TORCH_BN[_torch_bn_class(m)]
        return [lambda: cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **kwargs)]
    shape, eps = tuple(m.weight.shape), _hf_eps(m)
    has_bias = isinstance(getattr(m, "bias", None), nn.Parameter)
    # Llama-style modules name it variance_epsilon and scale by w; Gemma-style name it eps and use 1 + w
    offsets = (0.0, 1.0) if hasattr(m, "variance_epsilon") else (1.0, 0.0)
    rms = [lambda o=o: RMSNorm(shape, eps, bias=has_bias, weight_offset=o, **kwargs) for o in offsets]
    if type(m).__name__.endswith("LayerNorm"):
        return [lambda: LayerNorm(shape, eps, bias=has_bias, **kwargs), *rms]
    return rms


# ---------------------------------------------------------------------------------- copy and check


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}


def _like_old(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and floating dtype (read from its first floating parameter or
    buffer: a norm without affine parameters still has float64 running statistics to match)."""
    t = next((t for t in _tensors(old).values() if t.is_floating_point()), None)
    return new if t is None else new.to(device=t.device, dtype=t.dtype)


def _copy_matching(old: nn.Module, new: nn.Module) -> tuple[list[str], list[str]]:
    """Copy each parameter/buffer of ``old`` into the same-named one of ``new`` where shapes match.

    Returns ``(copied, not_copied)`` names (``not_copied``: ``new``'s tensors that kept their init).
    """
    src = _tensors(old)
    copied, kept = [], []
    with torch.no_grad():
        for name, t in _tensors(new).items():
            s = src.get(name)
            if s is not None and s.shape == t.shape and s.device.type != "meta" and t.device.type != "meta":
                t.copy_(s)
                if isinstance(t, nn.Parameter) and isinstance(s, nn.Parameter):
                    t.requires_grad_(s.requires_grad)
                copied.append(name)
            else:
                kept.append(name)
    return copied, kept


def _check(old: nn.Module, new: nn.Module, shape: tuple[int, ...]) -> tuple[bool | None, str]:
    """``(agree, detail)`` of ``old`` and ``new`` on a fixed random input, with their own parameters
    and with the same random ones; ``None`` when it cannot run (meta tensors)."""
    tensors = list(_tensors(old).values())
    if any(t.device.type == "meta" for t in tensors):
        return None, "not checked: parameters on the meta device"
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    gen = torch.Generator().manual_seed(0)
    try:
        o, n = copy.deepcopy(old).to(device, dtype).eval(), copy.deepcopy(new).to(device, dtype).eval()
        x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
        worst = 0.0
        for trial in range(2):
            if trial == 1:  # the same random parameters in both: the mapping, not just these values
                mine = _tensors(n)
                with torch.no_grad():
                    for name, t in _tensors(o).items():
                        if t.is_floating_point() and name in mine and mine[name].shape == t.shape:
                            r = torch.randn(t.shape, generator=gen, dtype=dtype)
                            r = r.abs() + 0.5 if "var" in name else r
                            t.copy_(r)
                            mine[name].copy_(r)
            with torch.no_grad():
                yo, yn = o(x), n(x)
            if not isinstance(yo, torch.Tensor) or not isinstance(yn, torch.Tensor) or yo.shape != yn.shape:
                return False, "outputs of different kind or shape"
            diff = (yn.to(dtype) - yo.to(dtype)).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            try:
                torch.testing.assert_close(yn.to(dtype), yo.to(dtype), rtol=RTOL, atol=ATOL)
            except AssertionError:
                return False, f"outputs differ (max |Δ| = {worst:.3g})"
        return True, f"max |Δ| = {worst:.3g}"
    except Exception as e:  # noqa: BLE001  (any failure of a candidate is a refusal, reported)
        return False, f"check failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------- the verb


def _where(where: Where | type | tuple[type, ...] | None) -> Where:
    if where is None:
        return lambda name, m: True
    if isinstance(where, type) or (isinstance(where, tuple) and all(isinstance(c, type) for c in where)):
        return lambda name, m: isinstance(m, where)
    if callable(where):
        return where
    raise TypeError(f"where must be a callable (name, module) -> bool or a class/tuple of classes, got {where!r}")


def _check_target(to: str | None) -> None:
    if to is None:
        return
    if not isinstance(to, str):
        raise TypeError(f"to must be a registered norm name or None, got {type(to).__name__}")
    try:
        norm_info(to)
    except ValueError:
        raise ValueError(
            f"replace_norms: to={to!r} is not a registered norm; registered names: {', '.join(list_norms(aliases=True))}"
        ) from None


def replace_norms(
    model: nn.Module,
    to: str | None = None,
    *,
    where: Where | type | tuple[type, ...] | None = None,
    inplace: bool = True,
    **kwargs: Any,
) -> NormReport:
    """Replace the normalization layers of ``model`` (recursively) with normkit's.

    Args:
        model: any ``nn.Module``; its root is considered too.
        to: ``None`` (default) — the exact normkit equivalent of each norm (torch's ``LayerNorm`` →
            ``normkit.LayerNorm``, ``LlamaRMSNorm`` → ``normkit.RMSNorm``, ``GemmaRMSNorm`` →
            ``normkit.RMSNorm(weight_offset=1)``, ...); a module none reproduces is kept and
            reported. A registered name (:func:`normkit.list_norms`) builds that norm for every
            recognised layer with ``create_norm(to, num_features, **kwargs)``, copying the
            parameters and buffers whose name and shape match; ``exact`` then says whether the
            outputs still agree. Unknown names raise ``ValueError``.
        where: which recognised norms to replace: a ``(qualified_name, module) -> bool`` predicate
            or a class / tuple of classes (default: all).
        inplace: ``False`` converts a deep copy (``report.model``) and leaves ``model`` untouched.
        **kwargs: passed to the new modules' constructors (e.g. ``backend="compiled"``).

    The new modules keep the old ones' device, parameter dtype and train/eval mode, and the
    state-dict keys stay the same for exact replacements, so checkpoints load both ways.

    Returns:
        :class:`NormReport`: one :class:`NormReplacement` ``(name, old, new, exact, note)`` per
        recognised norm (``new=None`` where it was kept), with the converted model as ``.model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_norms expects an nn.Module, got {type(model).__name__}")
    _check_target(to)
    accept = _where(where)
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    # id(old module) -> (exact, note); refusals by name (a refused module is built once, reported once)
    outcome: dict[int, tuple[bool, str]] = {}
    refused: list[NormReplacement] = []

    def match(name: str, m: nn.Module) -> bool:
        return recognise_norm(m) is not None and bool(accept(name, m))

    def build(name: str, m: nn.Module) -> nn.Module | None:
        kind = recognise_norm(m)
        new, exact, note = _build(m, kind, to, kwargs)
        if new is None:
            refused.append(NormReplacement(name, type(m).__name__, None, False, note))
        else:
            outcome[id(new)] = (exact, note)
        return new

    done = replace_modules(model, match, build, inplace=inplace)
    report = NormReport(done.model)
    entries = list(refused)
    for name, old_type, _new_type in done:
        new_module = done.model.get_submodule(name) if name else done.model
        exact, note = outcome[id(new_module)]
        entries.append(NormReplacement(name, old_type.__name__, type(new_module).__name__, exact, note))
    report.extend(sorted(entries, key=lambda r: order.get(r.name, len(order))))
    return report


def _build(m: nn.Module, kind: str | None, to: str | None, kwargs: dict[str, Any]) -> tuple[nn.Module | None, bool, str]:
    """``(new module or None, exact, note)`` for one recognised norm."""
    shape = _sample_shape(m, kind)
    exact_new, reasons = None, []
    for make in _exact_candidates(m, kind, kwargs):
        try:
            cand = _like_old(make(), m)
        except Exception as e:  # noqa: BLE001
            if kwargs:  # the shapes come from the module itself: a failure here is the user's kwargs
                err = TypeError if isinstance(e, TypeError) else ValueError
                what = f"the normkit equivalent of {type(m).__name__} with {kwargs}"
                raise err(f"replace_norms: building {what} failed: {e}") from e
            reasons.append(f"{type(e).__name__}: {e}")
            continue
        _copy_matching(m, cand)
        ok, detail = _check(m, cand, shape)
        if ok is None and kind != "third_party":  # meta tensors: torch's classes map by construction
            exact_new, exact_note = cand, detail
            break
        if ok:
            exact_new, exact_note = cand, f"checked: {detail}"
            break
        reasons.append(f"{_describe(cand)}: {detail}")
    if to is None:
        if exact_new is None:
            return None, False, "no exact normkit equivalent: " + "; ".join(reasons)
        return exact_new, True, exact_note
    try:
        new = _like_old(create_norm(to, _num_features(m, kind), **kwargs), m)
    except Exception as e:  # noqa: BLE001
        return None, False, f"create_norm({to!r}) failed: {type(e).__name__}: {e}"
    if exact_new is not None and type(new) is type(exact_new):
        return exact_new, True, exact_note
    copied, kept = _copy_matching(m, new)
    ok, detail = _check(m, new, shape)
    copy_note = f"copied: {', '.join(copied) or 'nothing'}" + (f"; new init: {', '.join(kept)}" if kept else "")
    if ok:
        return new, True, f"checked: {detail}; {copy_note}"
    return new, False, f"{detail}; {copy_note}"


def _describe(m: nn.Module) -> str:
    offset = getattr(m, "weight_offset", 0.0)
    return type(m).__name__ + (f"(weight_offset={offset:g})" if offset else "")

