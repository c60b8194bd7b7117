"""Hugging Face ``transformers`` models with normkit's norms (``pip install normkit[hf]``).

Two ways in, as Liger-Kernel's ``apply_liger_kernel_to_*``:

* :func:`apply_normkit` — **instance patch**: replaces every norm of an existing model (loaded or
  built) whose normkit equivalent is exact, by :func:`normkit.convert.replace_norms` (checked
  numerically per module; state-dict keys unchanged, so checkpoints load both ways);
* :func:`patch_transformers_classes` — **class patch**: while active, models built afterwards
  construct normkit modules in place of ``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``,
  ``Qwen3RMSNorm`` and ``GemmaRMSNorm`` (those whose modules exist in the installed version).
  Use it as a context manager, or call ``.restore()`` on the handle it returns.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    import transformers  # noqa: F401  (the optional dependency this module is about)
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "normkit.integrations.transformers needs the `transformers` package: pip install 'normkit[hf]'"
    ) from e

from torch import nn

from normkit.convert.replace_norms import NormReport, replace_norms
from normkit.nn import RMSNorm

__all__ = ["NormkitGemmaRMSNorm", "NormkitLlamaRMSNorm", "TransformersPatch", "apply_normkit", "patch_transformers_classes"]


def apply_normkit(model: nn.Module, *, inplace: bool = True, **kwargs: Any) -> NormReport:
    """Swap every norm of ``model`` that has an exact normkit equivalent; the rest are reported, not touched.

    ``kwargs`` go to the new modules (e.g. ``backend="compiled"``). Returns the
    :class:`~normkit.convert.NormReport` (``report.model`` is the converted model).
    """
    return replace_norms(model, None, inplace=inplace, **kwargs)


class NormkitLlamaRMSNorm(RMSNorm):
    """``normkit.RMSNorm`` with the constructor and attributes of ``LlamaRMSNorm`` (``w · x̂``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(hidden_size, eps, **kwargs)

    @property
    def variance_epsilon(self) -> float:
        return self.eps


class NormkitGemmaRMSNorm(RMSNorm):
    """``normkit.RMSNorm(weight_offset=1)`` with the constructor of ``GemmaRMSNorm`` (``(1 + w) · x̂``, ``w`` = 0 at init)."""

    def __init__(self, dim: int, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(dim, eps, weight_offset=1.0, **kwargs)


#: (module under ``transformers.models``, class name, replacement)
_CLASSES: tuple[tuple[str, str, type[nn.Module]], ...] = (
    ("llama.modeling_llama", "LlamaRMSNorm", NormkitLlamaRMSNorm),
    ("mistral.modeling_mistral", "MistralRMSNorm", NormkitLlamaRMSNorm),
    ("qwen2.modeling_qwen2", "Qwen2RMSNorm", NormkitLlamaRMSNorm),
    ("qwen3.modeling_qwen3", "Qwen3RMSNorm", NormkitLlamaRMSNorm),
    ("gemma.modeling_gemma", "GemmaRMSNorm", NormkitGemmaRMSNorm),
)


class TransformersPatch:
    """The classes :func:`patch_transformers_classes` replaced; ``restore()`` (or leaving the
    ``with`` block) puts the originals back. ``patched`` lists ``"module.Class"`` names."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    @property
    def patched(self) -> list[str]:
        return [f"{module.__name__}.{name}" for module, name, _ in self._saved]

    def _patch(self, module: Any, name: str, new: type[nn.Module]) -> None:
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, new)

    def restore(self) -> None:
        while self._saved:
            module, name, old = self._saved.pop()
            setattr(module, name, old)

    def __enter__(self) -> TransformersPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def patch_transformers_classes() -> TransformersPatch:
    """Make models created from now on use normkit's RMSNorm (Llama, Mistral, Qwen2, Qwen3, Gemma).

    Patches the class name in each ``transformers.models.<family>.modeling_<family>`` module that
    exists in the installed version (the modeling code looks it up there when it builds a layer).
    Models built before are unaffected (use :func:`apply_normkit` on them). Returns a
    :class:`TransformersPatch`; use ``with patch_transformers_classes(): ...`` or call
    ``.restore()``.
    """
    handle = TransformersPatch()
    for path, name, new in _CLASSES:
        try:
            module = importlib.import_module(f"transformers.models.{path}")
        except ImportError:
            continue
        if hasattr(module, name):
            handle._patch(module, name, new)
    return handle
