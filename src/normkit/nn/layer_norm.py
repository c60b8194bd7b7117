"""LayerNorm / RMSNorm modules (channels-last and channels-first).

They subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` so state-dict keys, shapes and
``isinstance`` checks stay torch's; checkpoints load both ways.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from normkit import functional as F
from normkit.backend import AUTO_RULES, UNBOUNDED, kernels_apply, native_below, resolve, thread_state
from normkit.functional._core import check_channels_first
from normkit.functional.aten import ATEN_CHECK_MIN_NUMEL
from normkit.functional.aten import layer_norm as aten_layer_norm
from normkit.functional.aten import rms_norm as aten_rms_norm
from normkit.functional.layer_norm import channels_first_kernels
from normkit.nn import papers
from normkit.nn._base import FastPath, options_repr, set_options
from normkit.registry import register_norm


def _check_reduction_dims(k: int | None, shape: tuple[int, ...]) -> int | None:
    """``reduction_dims`` as given (None: statistics over all of ``normalized_shape``), validated."""
    if k is None or k == len(shape):
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(shape):
        raise ValueError(f"reduction_dims must be an int in [1, {len(shape)}] (normalized_shape={shape}), got {k!r}")
    return k


def _per_group(m: nn.Module, x: Tensor, mask: Tensor | None, center: bool) -> Tensor:
    """The statistics over the last ``m.reduction_dims`` dims, the affine over all of ``normalized_shape``."""
    shape = m.normalized_shape
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{type(m).__name__} expects input of shape (*, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    return F.normalize(
        x, tuple(range(-m.reduction_dims, 0)), feature_dims=tuple(range(-len(shape), 0)), center=center,
        weight=m.weight, bias=m.bias, eps=m.eps if m.eps is not None else torch.finfo(x.dtype).eps,
        weight_offset=m.weight_offset, mask=mask, stats_dtype=m.stats_dtype, backend=m.backend,
    )


def _plain(self: nn.Module) -> bool:
    """No normkit-only option is set: ATen's op computes this layer exactly."""
    return not self.weight_offset and self.stats_dtype is None and self.reduction_dims is None


#: options whose assignment re-plans a token norm's fast path (:class:`normkit.nn._base.FastPath`)
_TOKEN_PLAN_ATTRS = frozenset({"backend", "weight_offset", "stats_dtype", "reduction_dims", "bias", "casting"})


def _replan_token(self: nn.Module, op: str, native: bool) -> None:
    """The per-configuration plan of LayerNorm / RMSNorm (and their ``forward_add``).

    ``_nk_below``: inputs with fewer elements (CPU, default backend, no mask) run ATen's op directly —
    the bound where ``"auto"`` picks ATen's op (:func:`normkit.backend.native_below`), capped at
    :data:`~normkit.functional.aten.ATEN_CHECK_MIN_NUMEL`, above which ATen's statistics are checked
    for overflow on the full path; 0 when an option ATen's op lacks is set. ``_nk_add_below``: the
    same for :meth:`forward_add` (``x + residual`` then the op). ``_nk_plain``: no normkit-only option.
    """
    plain = self._plain()
    ok = plain and native
    self._plan_set(
        _nk_plain=plain,
        _nk_below=min(native_below(op, self.backend), ATEN_CHECK_MIN_NUMEL) if ok else 0,
        _nk_add_below=min(native_below("add_norm", self.backend), ATEN_CHECK_MIN_NUMEL) if ok else 0,
    )


def _replan_channels_first(self: nn.Module, op: str) -> None:
    """``_nk_cf_from``: from this many input elements (default backend, no mask, an input the kernels take)
    a LayerNorm2d / RMSNorm2d runs normkit's kernels directly — where ``"auto"``'s table sends ``op`` to
    them on CPU (``kernels_apply`` tests the device); never (:data:`~normkit.backend.UNBOUNDED`) with a
    normkit-only option set or a backend other than ``"auto"``."""
    ok = self._nk_plain and self.backend in (None, "auto") and AUTO_RULES[op].cpu == "kernels"
    self._plan_set(_nk_cf_from=AUTO_RULES[op].min_numel if ok else UNBOUNDED)


def _forward_add(self: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """Fused pre-norm step: ``(norm(x + residual), x + residual)`` (LayerNorm or RMSNorm, by class)."""
    if x.numel() < self._nk_add_below and x.is_cpu and thread_state.plain and residual.shape == x.shape:
        s = x + residual  # small input, default backend: the sum and ATen's op (as functional.add_norm's native path)
        p = self._parameters  # (parameters read as in LayerNorm.forward)
        try:
            if self._nk_center:
                return torch.layer_norm(s, self.normalized_shape, p["weight"], p["bias"], self.eps, False), s
            return torch.rms_norm(s, self.normalized_shape, p["weight"], self.eps), s
        except (RuntimeError, KeyError):
            pass  # rejected, or a parameter moved out of _parameters: normkit's path below (its own errors)
    return F.add_norm(
        x, residual, self.normalized_shape, self.weight, self.bias, self.eps,
        norm="rmsnorm" if isinstance(self, nn.RMSNorm) else "layernorm",
        weight_offset=self.weight_offset, stats_dtype=self.stats_dtype, backend=self.backend,
    )


def _offset_init(module: nn.Module) -> None:
    # with a zero-centred (Gemma-style) weight the effective scale offset + w starts at 1
    offset = getattr(module, "weight_offset", 0.0)
    if offset and getattr(module, "weight", None) is not None:
        with torch.no_grad():
            module.weight.fill_(1.0 - offset)


#: rounding orders of :class:`RMSNorm`'s ``casting`` option (half-precision inputs), see its docstring
CASTINGS: tuple[str, ...] = ("llama", "gemma", "olmo2")


def _check_casting(casting: str | None, reduction_dims: int | None) -> str | None:
    if casting is None:
        return None
    if casting not in CASTINGS:
        raise ValueError(f"RMSNorm: casting must be None or one of {', '.join(map(repr, CASTINGS))}, got {casting!r}")
    if reduction_dims is not None:
        raise ValueError("RMSNorm: casting reproduces whole-vector RMSNorms; it cannot be combined with reduction_dims")
    return casting


def _cast_ordered_rms(m: nn.Module, x: Tensor) -> Tensor:
    """RMSNorm with a third-party rounding order, as plain torch ops (the same ops as the reference code,
    so the result is bit for bit theirs): statistics in float32, then

    * ``"llama"`` (transformers' Llama/Mistral/Qwen RMSNorm, Liger ``casting_mode="llama"``):
      ``x̂`` cast to the input dtype, *then* ``w · x̂``;
    * ``"gemma"`` (transformers' Gemma, Liger ``"gemma"``): everything in float32,
      ``x̂ · (offset + w.float())``, then cast;
    * ``"olmo2"`` (transformers' OLMo-2): ``(w · x̂)`` in float32 (type promotion), then cast.
    """
    dt = x.dtype
    xf = x.to(torch.float32)
    k = len(m.normalized_shape)
    dims = -1 if k == 1 else tuple(range(-k, 0))
    eps = m.eps if m.eps is not None else torch.finfo(dt).eps
    xh = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    w, offset = m.weight, m.weight_offset
    if m.casting == "gemma":
        y = (xh if w is None else xh * (offset + w.float())).type_as(x)
    else:
        we = None if w is None else (w + offset if offset else w)
        if m.casting == "llama":
            y = xh.to(dt) if we is None else we * xh.to(dt)
        else:  # olmo2
            y = (xh if we is None else we * xh).to(dt)
    return y if m.bias is None else y + m.bias


@register_norm(
    "layernorm",
    family="layer",
    paper=papers.LAYER_NORM,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="per-token mean/variance over the last dim(s), then affine",
    aliases=("ln", "layer_norm"),
)
class LayerNorm(FastPath, nn.LayerNorm):
    """LayerNorm over the trailing ``normalized_shape`` dims (drop-in for ``torch.nn.LayerNorm``).

    ``y = (x − E[x]) / sqrt(Var[x] + eps) · (weight_offset + w) + b`` (Ba et al. 2016, arXiv:1607.06450).

    Args:
        normalized_shape: trailing shape to normalize over (int or tuple).
        eps: added to the biased variance inside the square root (torch's default 1e-5).
        elementwise_affine: learn ``w`` (and ``b`` if ``bias``).
        bias: learn ``b``.
        weight_offset: Gemma-style scale ``offset + w``; ``w`` is then initialised to ``1 − offset``.
        reduction_dims: how many trailing dims of ``normalized_shape`` the statistics span (default:
            all). ``LayerNorm((H, Dh), reduction_dims=1)`` normalizes each head of a ``(..., H, Dh)``
            input on its own, with a weight per head (:func:`normkit.functional.normalize`).
        stats_dtype: accumulation dtype (default float32 for half inputs).
        backend: kernel backend for this layer (``None`` follows :func:`normkit.set_backend`).
    """
    _plain = _plain
    _PLAN_ATTRS = _TOKEN_PLAN_ATTRS
    _nk_below = _nk_add_below = 0  # (class defaults: no fast path until planned, e.g. an old pickle)
    _nk_plain = False
    _nk_center = True

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        weight_offset: float = 0.0,
        reduction_dims: int | None = None,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        self.weight_offset = float(weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.reduction_dims = _check_reduction_dims(reduction_dims, self.normalized_shape)
        self._plan_ready()

    def _replan(self) -> None:
        _replan_token(self, "layer_norm", True)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _offset_init(self)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None and x.numel() < self._nk_below and x.is_cpu and thread_state.plain:
            p = self._parameters  # (not self.weight: a failed lookup, then Module.__getattr__, ~0.8 µs each)
            try:  # the hot path: ATen's op, no wrapper (F.layer_norm's cudnn flag is ignored by ATen's op)
                return torch.layer_norm(x, self.normalized_shape, p["weight"], p["bias"], self.eps, False)
            except (RuntimeError, KeyError):
                pass  # rejected, or a parameter moved out of _parameters: normkit's path below (its own errors)
        if mask is None and self._nk_plain and resolve(self.backend, x, "layer_norm", True) == "native":
            try:  # ATen's op (checked for overflow from ATEN_CHECK_MIN_NUMEL elements)
                if x.numel() < ATEN_CHECK_MIN_NUMEL:
                    return TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
                y = aten_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
                if y is not None:  # else ATen's statistics overflowed: normkit's path below
                    return y
            except RuntimeError:
                pass  # rejected: normkit's path below raises its own, clearer error
        if self.reduction_dims is not None:
            return _per_group(self, x, mask, center=True)
        return F.layer_norm(
            x, self.normalized_shape, self.weight, self.bias, self.eps,
            weight_offset=self.weight_offset, mask=mask, stats_dtype=self.stats_dtype, backend=self.backend,
        )

    forward_add = _forward_add

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self, weight_offset=self.weight_offset, reduction_dims=self.reduction_dims)


@register_norm(
    "rmsnorm",
    family="layer",
    paper=papers.RMS_NORM,
    layout="channels_last",
    batch_dependent=False,
    train_eval_differ=False,
    description="per-token root-mean-square scaling over the last dim(s), no centering",
    aliases=("rms", "rms_norm"),
)
class RMSNorm(FastPath, nn.RMSNorm):
    """RMSNorm over the trailing dims (drop-in for ``torch.nn.RMSNorm``).

    ``y = x / sqrt(mean(x²) + eps) · (weight_offset + w) [+ b]`` (Zhang & Sennrich 2019, arXiv:1910.07467).
    ``eps=None`` uses ``torch.finfo(x.dtype).eps`` as torch does. ``bias=True`` adds an optional
    bias (not in the paper; some models use it); ``weight_offset=1.0`` gives Gemma's ``(1 + w)``.
    ``reduction_dims=k`` takes the statistics over the last k dims of ``normalized_shape`` only:
    ``RMSNorm((num_heads, head_dim), reduction_dims=1)`` is a per-head QK-norm with a weight per head.

    ``casting`` reproduces a third-party rounding order for float16/bfloat16 inputs (or a weight of
    another dtype than the input), so that a converted model's half-precision outputs are bit for bit
    the original's: ``"llama"`` (transformers' Llama/Mistral/Qwen RMSNorm and Liger's
    ``casting_mode="llama"``: normalise in float32, cast to the input dtype, then multiply by the
    weight), ``"gemma"`` (transformers' Gemma and Liger's ``"gemma"``: all in float32, ``x̂·(1 + w)``,
    then cast) or ``"olmo2"`` (``(w·x̂)`` in float32, then cast). Those inputs then run as plain torch
    ops (exact rounding over speed); float32/float64 inputs, where the orders coincide up to float
    rounding, keep the fast path. ``None`` (default): normkit's order (float32 statistics and affine,
    one rounding at the end).
    """
    _plain = _plain
    _PLAN_ATTRS = _TOKEN_PLAN_ATTRS
    _nk_below = _nk_add_below = 0  # (class defaults: no fast path until planned, e.g. an old pickle)
    _nk_plain = False
    _nk_center = False
    casting: str | None = None  # (class default: modules pickled before the option existed)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        bias: bool = False,
        weight_offset: float = 0.0,
        reduction_dims: int | None = None,
        casting: str | None = None,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        set_options(self, eps, stats_dtype=stats_dtype, backend=backend)
        self.weight_offset = float(weight_offset)
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.reduction_dims = _check_reduction_dims(reduction_dims, self.normalized_shape)
        self.casting = _check_casting(casting, self.reduction_dims)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        _offset_init(self)
        self._plan_ready()

    def _replan(self) -> None:
        # casting: half inputs take the rounding-order path, so the plan leaves such layers to forward's test
        _replan_token(self, "rms_norm", getattr(self, "bias", None) is None and self.casting is None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)
        _offset_init(self)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None and x.numel() < self._nk_below and x.is_cpu and thread_state.plain:
            try:  # the hot path: ATen's op, no wrapper; the weight read as in LayerNorm.forward
                return torch.rms_norm(x, self.normalized_shape, self._parameters["weight"], self.eps)
            except (RuntimeError, KeyError):
                pass  # rejected, or the weight moved out of _parameters: normkit's path below (its own errors)
        if self.casting is not None and (x.dtype in (torch.float16, torch.bfloat16) or (
                self.weight is not None and self.weight.dtype != x.dtype)):
            if mask is not None:
                raise ValueError(f"RMSNorm(casting={self.casting!r}) does not take a mask for {x.dtype} input")
            return _cast_ordered_rms(self, x)
        if (mask is None and self.bias is None and self._nk_plain
                and resolve(self.backend, x, "rms_norm", True) == "native"):
            try:  # ATen's op directly (small inputs, or no kernels): no Python in between
                if x.numel() < ATEN_CHECK_MIN_NUMEL:
                    return TF.rms_norm(x, self.normalized_shape, self.weight, self.eps)
                y = aten_rms_norm(x, self.normalized_shape, self.weight, self.eps)
                if y is not None:  # else ATen's statistics overflowed: normkit's path below
                    return y
            except RuntimeError:
                pass  # rejected: normkit's path below raises its own, clearer error
        if self.reduction_dims is not None:
            return _per_group(self, x, mask, center=False)
        return F.rms_norm(
            x, self.normalized_shape, self.weight, self.eps, bias=self.bias,
            weight_offset=self.weight_offset, mask=mask, stats_dtype=self.stats_dtype, backend=self.backend,
        )

    forward_add = _forward_add

    def extra_repr(self) -> str:
        return super().extra_repr() + (", bias=True" if self.bias is not None else "") + options_repr(
            self, weight_offset=self.weight_offset, reduction_dims=self.reduction_dims
        ) + (f", casting={self.casting!r}" if self.casting else "")


@register_norm(
    "layernorm2d",
    family="layer",
    paper=papers.LAYER_NORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="LayerNorm over the channel dim of (N, C, *) input (ConvNeXt style)",
    aliases=("ln2d",),
)
class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels of a channels-first ``(N, C, *)`` tensor (timm's ``LayerNorm2d`` layout).

    Same keys as ``nn.LayerNorm(C)``; normalizes each spatial position over its C channels
    without transposing the input. The default eps is torch's ``nn.LayerNorm`` 1e-5 (as every
    LayerNorm here); timm's ``LayerNorm2d`` and ConvNeXt use 1e-6, so pass ``eps=1e-6`` to
    reproduce them exactly (a converted timm model keeps its own eps).

    Output layout: the same strides as timm's LayerNorm2d, channels-last memory for an NCHW input
    (written directly by normkit's C++ kernel on the default backend; a channels-last input runs as
    rows with no copy): the convolutions around it then run channels_last as they do in timm
    (:func:`normkit.functional.layer_norm2d` has the details).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, bias: bool = True, **kwargs) -> None:  # noqa: ANN003
        super().__init__(num_channels, eps, affine, bias, **kwargs)

    _nk_cf_from = UNBOUNDED  # (class default: no fast path until planned)

    def _replan(self) -> None:
        super()._replan()
        _replan_channels_first(self, "layer_norm2d")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if (mask is None and x.numel() >= self._nk_cf_from and thread_state.plain and kernels_apply(x)
                and x.dim() > 1 and x.shape[1] == self.normalized_shape[0]):  # the hot path: "auto"'s kernels
            return channels_first_kernels(x, x.shape[1], self.weight, self.bias, self.eps, True)
        check_channels_first(x, self.normalized_shape[0], type(self).__name__)
        return F.layer_norm2d(
            x, self.weight, self.bias, self.eps,
            weight_offset=self.weight_offset, mask=mask, stats_dtype=self.stats_dtype, backend=self.backend,
        )


@register_norm(
    "rmsnorm2d",
    family="layer",
    paper=papers.RMS_NORM,
    layout="channels_first",
    batch_dependent=False,
    train_eval_differ=False,
    description="RMSNorm over the channel dim of (N, C, *) input",
    aliases=("rms2d",),
)
class RMSNorm2d(RMSNorm):
    """RMSNorm over the channels of a channels-first ``(N, C, *)`` tensor (timm's ``RmsNorm2d``).

    Output layout: channels-last memory for an NCHW input, as :class:`LayerNorm2d` and the permute +
    ``F.rms_norm`` + permute spelling (timm's current ``RmsNorm2d``, a reduction over dim 1, returns
    x's layout instead); :func:`normkit.functional.rms_norm2d` has the details.
    """

    def __init__(self, num_channels: int, eps: float | None = None, affine: bool = True, **kwargs) -> None:  # noqa: ANN003
        super().__init__(num_channels, eps, affine, **kwargs)

    _nk_cf_from = UNBOUNDED  # (class default: no fast path until planned)

    def _replan(self) -> None:
        super()._replan()
        _replan_channels_first(self, "rms_norm2d")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if (mask is None and x.numel() >= self._nk_cf_from and thread_state.plain and kernels_apply(x)
                and x.dim() > 1 and x.shape[1] == self.normalized_shape[0]):  # the hot path: "auto"'s kernels
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return channels_first_kernels(x, x.shape[1], self.weight, self.bias, eps, False)
        check_channels_first(x, self.normalized_shape[0], type(self).__name__)
        return F.rms_norm2d(
            x, self.weight, self.eps, bias=self.bias,
            weight_offset=self.weight_offset, mask=mask, stats_dtype=self.stats_dtype, backend=self.backend,
        )
