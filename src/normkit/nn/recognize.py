"""Recognising normalization layers by behaviour, and building their exact normkit equivalents.

One recognition for every model-walking helper: :func:`normkit.convert.replace_norms`, the
transformers integration, :func:`normkit.nn.apply_layernorm_scaling`, and :mod:`normkit.adapt`'s
norm-only training and test-time adaptation all find norms through :func:`recognise_norm`.

Recognition is by behaviour, not by a list of classes:

* torch's ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` (and
  subclasses) map to normkit's class of the same name with the same arguments;
* a third-party module whose class name ends in ``RMSNorm`` or ``LayerNorm`` and that has a
  ``weight`` parameter and an ``eps`` or ``variance_epsilon`` attribute (every transformers
  RMSNorm: Llama, Mistral, Qwen2/3, Gemma, OLMo-2, ...) is tried against ``normkit.RMSNorm`` (scale
  ``w`` and Gemma's ``1 + w``) and ``normkit.LayerNorm``, with its stored weight copied as is.

:func:`exact_equivalent` checks every mapping numerically when it is made: the old and the new
module (copies, in eval mode, float32 — float64 for a float64 module) run on one fixed random input,
once with their own parameters and once with the same random parameters in both, and must agree to
float32's default tolerance (``torch.testing.assert_close``). For a third-party RMSNorm it then
finds the rounding order (``RMSNorm(casting=...)``: ``"llama"``, ``"olmo2"`` or ``"gemma"``) whose
bfloat16 and float16 outputs equal the module's bit for bit, so half-precision models convert
exactly. Normkit's own modules are never recognised (they need no conversion).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normkit.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm
from normkit.nn.layer_norm import CASTINGS, LayerNorm, RMSNorm

__all__ = [
    "ATOL",
    "RTOL",
    "exact_equivalent",
    "hf_eps",
    "is_normkit",
    "is_third_party_norm",
    "recognise_norm",
    "scale_offset",
]

#: float32's default tolerances of ``torch.testing.assert_close``, used for every check
RTOL, ATOL = 1.3e-6, 1e-5


# ---------------------------------------------------------------------------------- recognition

_TORCH_BN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_BN_SAMPLE = {nn.BatchNorm1d: (3,), nn.BatchNorm2d: (3, 3), nn.BatchNorm3d: (2, 2, 2)}


def is_normkit(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "normkit"


def hf_eps(m: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def recognise_norm(m: nn.Module) -> str | None:
    """The kind of norm ``m`` is (``"layernorm"``, ``"rmsnorm"``, ``"groupnorm"``, ``"batchnorm"``,
    ``"third_party"``), or ``None`` for anything else, normkit's own modules included.

    ``"third_party"`` is a candidate only: :func:`exact_equivalent` converts it after the numerical check.
    """
    if is_normkit(m):
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
            and hf_eps(m) is not None):
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
    shape, eps = tuple(m.weight.shape), hf_eps(m)
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


def _describe(m: nn.Module) -> str:
    offset = getattr(m, "weight_offset", 0.0)
    return type(m).__name__ + (f"(weight_offset={offset:g})" if offset else "")


def is_third_party_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a recognised third-party norm (e.g. transformers' ``LlamaRMSNorm``), always of the layer family."""
    return recognise_norm(m) == "third_party"


def scale_offset(m: nn.Module) -> float:
    """The constant ``o`` in a norm's effective scale ``o + weight``: normkit's ``weight_offset``, 0 for
    torch's classes, and for a third-party norm found by running a copy with its weight zeroed (Gemma's
    ``(1 + w)`` gives an output ≈ x̂, Llama's ``w`` gives 0)."""
    if not is_third_party_norm(m):
        return float(getattr(m, "weight_offset", 0.0) or 0.0)
    probe = copy.deepcopy(m).float().eval()
    with torch.no_grad():
        probe.weight.zero_()
        if isinstance(getattr(probe, "bias", None), torch.Tensor):
            probe.bias.zero_()
        x = torch.randn((2, *probe.weight.shape), generator=torch.Generator().manual_seed(0)).to(probe.weight.device)
        y = probe(x)
    return 0.0 if float(y.abs().max()) < 1e-6 else 1.0


def _casting_matches(old: nn.Module, new: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``new`` equals ``old`` bit for bit in bfloat16 and float16 (random weights and input)."""
    gen = torch.Generator().manual_seed(1)
    for dt in (torch.bfloat16, torch.float16):
        o, n = copy.deepcopy(old).to(dtype=dt).eval(), copy.deepcopy(new).to(dtype=dt).eval()
        x = (torch.randn(shape, generator=gen) * 3).to(dt)
        mine = _tensors(n)
        with torch.no_grad():
            for name, t in _tensors(o).items():
                if t.is_floating_point() and name in mine and mine[name].shape == t.shape:
                    r = torch.randn(t.shape, generator=gen).to(dt)
                    t.copy_(r)
                    mine[name].copy_(r)
            yo, yn = o(x), n(x)
        if not isinstance(yo, torch.Tensor) or yo.dtype != yn.dtype or not torch.equal(yo, yn):
            return False
    return True


def _detect_casting(old: nn.Module, new: RMSNorm, shape: tuple[int, ...]) -> str:
    """Give ``new`` the rounding order that reproduces ``old`` in half precision; returns a note."""
    device_ok = all(t.device.type == "cpu" for t in _tensors(old).values())
    if not device_ok:
        return "half-precision rounding order not checked (parameters off the CPU)"
    for casting in ("llama", "olmo2", "gemma"):
        assert casting in CASTINGS
        new.casting = casting
        try:
            if _casting_matches(old, new, (4, 5, *shape[2:])):
                return f"casting={casting!r} (bf16/fp16 bit for bit)"
        except Exception:  # noqa: BLE001  (a module that refuses half inputs: no casting to match)
            break
    new.casting = None
    return "no rounding order matched bit for bit in bf16/fp16 (normkit's order kept)"


def exact_equivalent(m: nn.Module, kind: str | None = None, **kwargs: Any) -> tuple[nn.Module | None, str]:
    """The normkit module that computes what ``m`` computes, with ``m``'s parameters, or ``None``.

    Returns ``(module, note)``: the note gives the check's worst difference (and, for third-party
    RMSNorms, the rounding order chosen), or why no candidate matched. ``kwargs`` go to the new
    module's constructor (a failure with them raises ``TypeError``/``ValueError``).
    """
    kind = kind or recognise_norm(m)
    if kind is None:
        return None, f"{type(m).__name__} is not a recognised norm"
    shape = _sample_shape(m, kind)
    reasons = []
    for make in _exact_candidates(m, kind, kwargs):
        try:
            cand = _like_old(make(), m)
        except Exception as e:  # noqa: BLE001
            if kwargs:  # the shapes come from the module itself: a failure here is the user's kwargs
                err = TypeError if isinstance(e, TypeError) else ValueError
                what = f"the normkit equivalent of {type(m).__name__} with {kwargs}"
                raise err(f"building {what} failed: {e}") from e
            reasons.append(f"{type(e).__name__}: {e}")
            continue
        _copy_matching(m, cand)
        ok, detail = _check(m, cand, shape)
        if ok is None and kind != "third_party":  # meta tensors: torch's classes map by construction
            return cand, detail
        if ok:
            note = f"checked: {detail}"
            if kind == "third_party" and isinstance(cand, RMSNorm) and "casting" not in kwargs:
                note += "; " + _detect_casting(m, cand, shape)
            return cand, note
        reasons.append(f"{_describe(cand)}: {detail}")
    return None, "no exact normkit equivalent: " + "; ".join(reasons)
