"""BatchNorm variants over channels-first ``(N, C, *)`` input: Ghost BatchNorm and Batch Renormalization."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional._core import (
    canonical_mask,
    check_channels_first,
    check_eps,
    check_momentum,
    check_param,
    normalize_view,
    trailing_numel,
)
from normkit.functional.batch_norm import _update_running, batch_norm, channel_affine
from normkit.stats import Reducer, accumulation_dtype, moments, rescue_scale

_RESCUE = rescue_scale(torch.float32)  # 2^-70: c·x of a float32 past 1.8e19 has a finite square


@torch.no_grad()
def batch_moments(x: Tensor, stats_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, bool]:
    """Per-channel batch mean and *biased* variance of an ``(N, C, *)`` tensor, without gradient, in one pass.

    The statistics the BatchNorm variants fold into a per-channel weight/bias (Batch Renorm's r, d;
    EstBN's estimate update). On CPU for float32/float64 input this is ATen's one-pass per-channel
    kernel ``torch.batch_norm_update_stats`` (measured 2× faster than ``torch.var_mean`` over
    ``(0, 2, …)`` at 32×64×56×56: 24 vs 48 ms on the loaded 2-core machine); elsewhere
    ``torch.var_mean`` in the accumulation dtype.

    Returns ``(mean, var, rescued)``, shapes ``(C,)``. Overflow: a finite float32 input with a
    spread past ~1.8e19 has a variance past FLT_MAX; then (eager code, checked with one ``sum().item()``
    on C values) the variance is recomputed from the input scaled by the exact power of two 2^-70
    and returned **in float64** with its true value, and ``rescued`` is True so the caller can take
    an overflow-safe route for the output. Under a compiler no check runs (``rescued`` is False).
    """
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xd = x.detach()
    if x.device.type == "cpu" and x.dtype == sd and x.numel() and not torch.compiler.is_compiling():
        mean, var = torch.batch_norm_update_stats(xd, None, None, 0.0)
    else:
        var, mean = torch.var_mean(xd.to(sd), (0, *range(2, x.dim())), correction=0)
    if torch.compiler.is_compiling() or math.isfinite(var.sum().item()):
        return mean, var, False
    big = torch.float64 if x.device.type != "mps" else sd
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scaled = (xd.to(sd) * _RESCUE - (mean * _RESCUE).reshape(shape)).square().mean(dims)
    var = torch.where(torch.isfinite(var), var.to(big), scaled.to(big) / (_RESCUE * _RESCUE))
    return mean, var, True


# --------------------------------------------------------------------------- per-sample moments + affine
#
# Every layer of this family whose statistics are batch or sample moments over the positions (IBN's
# InstanceNorm + BatchNorm halves, BCN's BatchNorm then GroupNorm, AdaB2N's task-weighted moments,
# Ghost BN's per-chunk moments) is, per sample n and channel c, an affine map of the input
#
#     y[n, c, l] = x[n, c, l] · A[n, c] + B[n, c]
#
# whose coefficients are functions of the per-(n, c) mean m and biased variance v over the positions
# (batch moments follow exactly by the parallel-axis rule: μ_c = mean_n m, σ²_c = mean_n (v + (m − μ_c)²)).
# So two autograd functions do all the input-sized work, each with a closed-form backward that saves only
# the input and (N, C) values: sample_moments (one statistics pass) and sample_affine (one output pass);
# the (N, C)-sized algebra between them runs as ordinary torch ops, and autograd chains them exactly.


def moments_fast_path(backend: str | None, x: Tensor | None = None) -> bool:
    """Whether a layer of this family takes :func:`sample_moments`/:func:`sample_affine` (backend ``"auto"``).

    ``"eager"`` keeps each layer's plain formula (the reference), the other named backends their ops.
    ``x`` (the layer's input): below :data:`normkit.backend.CLOSED_FORM_MIN_NUMEL` elements the layer's own
    path over ATen's ops is faster (two autograd functions cost more Python than they save there), so
    ``"auto"`` takes it; without ``x`` the closed form is taken at every size.
    """
    if (_backend.get_backend() if backend is None else backend) != "auto":
        return False
    if x is not None and x.numel() < _backend.CLOSED_FORM_MIN_NUMEL:
        return False
    _backend.note("sample_moments", "aten")
    return True


def _nc_moments(x3: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C) mean and biased variance over the last axis of an (N, C, L) tensor, float64 where it overflowed."""
    n, c, length = x3.shape
    if x3.numel() == 0:
        nan = x3.new_full((n, c), float("nan"))
        return nan, nan
    # ATen's GroupNorm statistics with one group per channel and eps = 0 (so var = 1/r² exactly up to
    # rounding): one pass; measured as fast as a copy, where torch.var_mean over the last axis is 3–6×
    # slower. (The normalized output it also writes is not used.)
    x3 = x3.contiguous()  # (a copy only for a strided view, e.g. channels_last input moved to (N, C, *))
    _, mean, rstd = torch.native_group_norm(x3, None, None, n, c, length, c, 0.0)
    var = rstd.square().reciprocal()
    if torch.compiler.is_compiling() or math.isfinite(var.sum().item()):
        return mean, var
    # past FLT_MAX: the variance from the exactly scaled input, returned in float64 with its true value
    big = torch.float64 if x3.device.type != "mps" else x3.dtype
    _, _, rs = torch.native_group_norm(x3 * _RESCUE, None, None, n, c, length, c, 0.0)
    vs = rs.to(big).square().reciprocal() / (_RESCUE * _RESCUE)
    return mean.to(big), torch.where(torch.isfinite(var), var.to(big), vs)


class _Link:
    """Hands the affine's ``∂L/∂y`` and ``A`` to the moments' backward of the same input, so that the two
    contributions to ``∂L/∂x`` are formed in one buffer: ``(x·P + K) + g·A`` by two fused passes instead of
    ``g·A``, ``x·P + K`` and autograd's sum of the two (three passes, one more input-sized tensor)."""

    __slots__ = ("x", "g", "a")

    def __init__(self, x: Tensor) -> None:
        self.x: Tensor | None = x
        self.g: Tensor | None = None
        self.a: Tensor | None = None


class _SampleMomentsFn(torch.autograd.Function):
    """``(m, v)[n, c]`` = mean and biased variance of ``x[n, c, :]``; backward
    ``∂L/∂x = (∂L/∂m + 2 ∂L/∂v · (x − m)) / L`` in one pass (saves x and m)."""

    @staticmethod
    def forward(ctx, x: Tensor, sd: torch.dtype) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        n, c = x.shape[0], x.shape[1]
        mean, var = _nc_moments(x.reshape(n, c, trailing_numel(x)).to(sd))
        ctx.save_for_backward(x, mean)
        ctx.link = None
        if not torch.compiler.is_compiling():
            ctx.link = mean._normkit_link = _Link(x)  # found by sample_affine(..., moments_of=mean)
        return mean, var

    @staticmethod
    def backward(ctx, gm: Tensor, gv: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        n, c, length = x.shape[0], x.shape[1], trailing_numel(x)
        dt = torch.promote_types(gv.dtype, mean.dtype)
        tail = (1,) * (x.dim() - 2)
        p = (gv.to(dt) * (2.0 / max(length, 1))).reshape(n, c, *tail)
        k = (gm.to(dt) / max(length, 1)).reshape(n, c, *tail) - p * mean.to(dt).reshape(n, c, *tail)
        dx = torch.addcmul(k, x.to(dt), p)  # differentiable as written: create_graph=True differentiates it
        link = ctx.link
        if link is not None and link.g is not None:  # the affine's g·A, added in place (see _Link)
            dx = dx.addcmul_(link.g.to(dt), link.a)
            link.g = link.a = None
        return dx.to(x.dtype), None


class _SampleAffineFn(torch.autograd.Function):
    """``y = x · A + B`` with (N, C) or (1, C) coefficients; backward ``∂x = g·A``, ``∂A = Σ_l g·x``,
    ``∂B = Σ_l g`` (saves x and A)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor, link: _Link | None) -> Tensor:  # type: ignore[override]
        sd = accumulation_dtype(x.dtype)
        tail = (1,) * (x.dim() - 2)  # broadcast, so the output has x's shape (not a view of a reshape)
        ctx.save_for_backward(x, scale)  # inputs, not values made here: a double backward differentiates them
        ctx.shapes = (scale.shape, scale.dtype, shift.shape, shift.dtype)
        ctx.link = link if link is not None and link.x is x and (scale.requires_grad or shift.requires_grad) else None
        return torch.addcmul(shift.to(sd).reshape(shift.shape + tail), x, scale.to(sd).reshape(scale.shape + tail)).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, scale = ctx.saved_tensors
        a_shape, a_dtype, b_shape, b_dtype = ctx.shapes
        n, c, length = x.shape[0], x.shape[1], trailing_numel(x)
        a = scale.to(accumulation_dtype(x.dtype)).reshape(a_shape + (1,) * (x.dim() - 2))
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.link is not None and not torch.is_grad_enabled():
                ctx.link.g, ctx.link.a = g, a  # the moments' backward (it runs after this one) adds g·A
            else:
                dx = (g.to(a.dtype) * a).to(x.dtype)
        g3 = g.reshape(n, c, length).to(a.dtype)
        da = db = None
        if ctx.needs_input_grad[1]:  # Σ_l g·x without an input-sized temporary (a batched dot product)
            da = torch.einsum("ncl,ncl->nc", g3, x.reshape(n, c, length).to(a.dtype))
            da = da.sum(0, keepdim=True) if a_shape[0] == 1 and n != 1 else da
            da = da.reshape(a_shape).to(a_dtype)
        if ctx.needs_input_grad[2]:
            db = g3.sum(2)
            db = (db.sum(0, keepdim=True) if b_shape[0] == 1 and n != 1 else db).reshape(b_shape).to(b_dtype)
        return dx, da, db, None


def sample_moments(x: Tensor, stats_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased variance over the positions of ``(N, C, *)`` ``x``: two ``(N, C)``
    tensors in the accumulation dtype (float64 for channels whose float32 variance overflowed: the true value),
    differentiable (closed-form backward that saves only ``x`` and the means)."""
    return _SampleMomentsFn.apply(x, accumulation_dtype(x.dtype, stats_dtype))


def sample_affine(x: Tensor, scale: Tensor, shift: Tensor, *, moments_of: Tensor | None = None) -> Tensor:
    """``x[n, c, ...] · scale[n, c] + shift[n, c]`` (coefficients ``(N, C)`` or ``(1, C)``) in the accumulation
    dtype, returned in ``x``'s; backward saves only ``x`` and ``scale``.

    ``moments_of``: the mean :func:`sample_moments` returned for this same ``x`` when ``scale``/``shift`` are
    functions of those moments (with gradient). Then the moments' backward — which autograd runs after this
    one — forms the whole ``∂L/∂x`` in one buffer (one pass and one input-sized tensor less). Eager, first-order
    backward only; a double backward or a compiled graph takes the plain two-term route.
    """
    link = None if moments_of is None or torch.compiler.is_compiling() else getattr(moments_of, "_normkit_link", None)
    return _SampleAffineFn.apply(x, scale, shift, link)


def pooled_moments(
    mean: Tensor, var: Tensor, weights: Tensor | None = None, dim: int = 0
) -> tuple[Tensor, Tensor]:
    """Moments of a pool of rows from the rows' moments (axis ``dim`` pooled), exactly (parallel-axis rule)::

        μ = Σ_n w_n m_n,   σ² = Σ_n w_n (v_n + (m_n − μ)²)      (w_n = 1/N when ``weights`` is None)

    — a sum of non-negative terms, no cancellation. For equal-sized rows this is the mean and biased
    variance over the pooled rows' positions (BatchNorm's from per-sample moments with ``dim=0``,
    GroupNorm's from per-channel moments over a group axis). ``weights`` has the pooled axis' length.
    """
    if weights is None:
        mu = mean.mean(dim, keepdim=True)
        sigma2 = (var + (mean - mu).square()).mean(dim)
        return mu.squeeze(dim), sigma2
    w = weights.to(mean.dtype).reshape(-1, *([1] * (mean.dim() - 1 - dim % mean.dim())))
    mu = (w * mean).sum(dim, keepdim=True)
    return mu.squeeze(dim), (w * (var + (mean - mu).square())).sum(dim)


def bn_coefficients(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of ``(x − mean)/sqrt(var + eps)·weight + bias = x·A + B`` (any broadcastable shapes)."""
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * weight.to(a.dtype)
    b = -mean.to(a.dtype) * a
    if bias is not None:
        b = b + bias.to(b.dtype)
    return a, b


def momentum_step(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """One BatchNorm update's factor, as torch: ``num_batches_tracked += 1`` (when given), then ``momentum``,
    or the cumulative ``1 / num_batches_tracked`` when ``momentum`` is None (0.0 without a counter)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else float(momentum)


def check_virtual_batch_size(virtual_batch_size: int, what: str = "ghost_batch_norm") -> int:
    if not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool) or virtual_batch_size <= 0:
        raise ValueError(f"{what}: virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    return virtual_batch_size


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 128,
    *,
    num_batches_tracked: Tensor | None = None,
    mask: Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Ghost Batch Normalization: BatchNorm over virtual batches of ``virtual_batch_size`` samples.

    Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in
    large batch training of neural networks", 2017, arXiv:1705.08741 (Algorithm 1).

    Training: the batch is split along dim 0 into consecutive chunks of ``virtual_batch_size``
    samples; **when N is not divisible the last chunk is smaller** (``x.split(virtual_batch_size)``
    — N = 10, size 4 gives 4, 4, 2). Each chunk is normalized with its own mean and biased
    variance (over its samples and positions) exactly like :func:`normkit.functional.batch_norm`,
    then the shared per-channel affine is applied. The running statistics, when given, are
    updated **once per virtual batch, in order** — what the common implementations do by calling
    ``BatchNorm`` on each chunk — so a batch of k chunks applies k momentum steps
    (``num_batches_tracked``, if given, is incremented k times; ``momentum=None`` then uses the
    cumulative factor ``1 / num_batches_tracked`` per chunk). The paper itself computes the
    running statistics from the ghost-batch moments by a moving average; the per-chunk update
    is that average taken sequentially.

    Eval (``training=False``): plain BatchNorm with the running statistics, independent of N.
    Without running statistics, eval also uses ghost-batch statistics.
    """
    eps = check_eps(eps)
    vbs = check_virtual_batch_size(virtual_batch_size)
    c = check_channels_first(x, None if running_mean is None else running_mean.numel(), "ghost_batch_norm")
    check_param(weight, c, "weight", "ghost_batch_norm")
    check_param(bias, c, "bias", "ghost_batch_norm")
    if not training and running_mean is not None and running_var is not None:
        return channel_affine(x, running_mean, running_var, weight, bias, eps)
    n = x.shape[0]
    per_sample = x.numel() // max(n * c, 1)
    last = n % vbs or min(vbs, n)
    if last * per_sample <= 1:
        raise ValueError(
            f"ghost_batch_norm: the last virtual batch has {last} sample(s) of {per_sample} value(s) per channel "
            f"(N={n}, virtual_batch_size={vbs}); BatchNorm needs more than 1 value per channel. "
            "Use a batch size that leaves at least 2 samples in the last chunk, or a different virtual_batch_size"
        )
    update = training and running_mean is not None and running_var is not None
    # (the closed form at every size: the per-chunk loop below runs ATen's BatchNorm unchecked for overflow
    # under ATEN_CHECK_MIN_NUMEL elements, and its running-statistic updates between chunks break gradcheck)
    if mask is None and moments_fast_path(backend):
        return _ghost_fused(x, running_mean, running_var, weight, bias, momentum, eps, vbs, num_batches_tracked,
                            update, stats_dtype)
    masks = [None] * math.ceil(n / vbs) if mask is None else list(canonical_mask(mask, x, x.shape).split(vbs, 0))
    outs = []
    for chunk, m in zip(x.split(vbs, 0), masks):
        factor = momentum_step(momentum, num_batches_tracked if update else None)
        outs.append(
            batch_norm(
                chunk,
                running_mean if update else None,
                running_var if update else None,
                weight,
                bias,
                True,
                factor,
                eps,
                mask=m,
                stats_dtype=stats_dtype,
                backend=backend,
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _ghost_fused(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    momentum: float | None, eps: float, vbs: int, num_batches_tracked: Tensor | None, update: bool,
    stats_dtype: torch.dtype | None,
) -> Tensor:
    """Ghost BN as one per-(sample, channel) affine map: each chunk's moments pooled from the per-sample ones
    (one statistics pass, one output pass; no per-chunk calls, no concatenation; only x saved)."""
    n, c = x.shape[0], x.shape[1]
    mean, var = sample_moments(x, stats_dtype)
    full, last = divmod(n, vbs)
    mus, sigmas, sizes = [], [], []
    if full:  # the equal chunks at once
        mu, s2 = pooled_moments(mean[: full * vbs].reshape(full, vbs, c), var[: full * vbs].reshape(full, vbs, c), dim=1)
        mus.append(mu)
        sigmas.append(s2)
        sizes += [vbs] * full
    if last:
        mu, s2 = pooled_moments(mean[full * vbs:], var[full * vbs:])
        mus.append(mu[None])
        sigmas.append(s2[None])
        sizes.append(last)
    mu, s2 = torch.cat(mus), torch.cat(sigmas)  # (chunks, C)
    if update:  # one momentum step per virtual batch, in order (as BatchNorm called on each chunk)
        per_sample = trailing_numel(x)
        for j, size in enumerate(sizes):
            factor = momentum_step(momentum, num_batches_tracked)
            _update_running(running_mean, running_var, mu[j], s2[j], float(size * per_sample), factor)
    scale, shift = bn_coefficients(mu, s2, weight, bias, eps)
    return sample_affine(x, _per_sample(scale, full, vbs, last), _per_sample(shift, full, vbs, last), moments_of=mean)


def _per_sample(t: Tensor, full: int, vbs: int, last: int) -> Tensor:
    """(chunks, C) → (N, C), each chunk's row for its samples. By expand (backward: a sum over the copies), not
    ``repeat_interleave``, whose backward on CPU is a ``scatter_add`` measured at ~160 ms for 2048 values."""
    parts = [t[:full].unsqueeze(1).expand(full, vbs, t.shape[1]).reshape(full * vbs, t.shape[1])] if full else []
    if last:
        parts.append(t[full:].expand(last, t.shape[1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def batch_renorm_limits(
    step: Tensor,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_end_step: int = 40000,
    d_max_end_step: int = 25000,
) -> tuple[Tensor, Tensor]:
    """The paper's schedule of the clipping bounds at training step ``step`` (a tensor, 1 = first step).

    Ioffe 2017, arXiv:1702.03275, §4: ``r_max = 1, d_max = 0`` (plain BatchNorm) for the first
    ``warmup_steps`` steps, then linear ramps reaching ``r_max`` at ``r_max_end_step`` and
    ``d_max`` at ``d_max_end_step`` (paper: 5000, 40k, 25k with r_max 3, d_max 5), constant after.
    Pure tensor arithmetic (no Python branch on ``step``), so it compiles without graph breaks.
    """
    for name, val in (("warmup_steps", warmup_steps), ("r_max_end_step", r_max_end_step), ("d_max_end_step", d_max_end_step)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"batch_renorm_limits: {name} must be a non-negative int, got {val!r}")
    if r_max_end_step < warmup_steps or d_max_end_step < warmup_steps:
        raise ValueError(
            f"batch_renorm_limits: the ramps must end after the warm-up (warmup_steps={warmup_steps}, "
            f"r_max_end_step={r_max_end_step}, d_max_end_step={d_max_end_step})"
        )
    _check_limits(r_max, d_max)
    return _renorm_schedule(step, r_max, d_max, warmup_steps, r_max_end_step, d_max_end_step)


def _renorm_schedule(
    step: Tensor, r_max: float, d_max: float, warmup_steps: int, r_max_end_step: int, d_max_end_step: int
) -> tuple[Tensor, Tensor]:
    """:func:`batch_renorm_limits` without the argument checks (for callers that validated them once)."""
    t = step.to(torch.float32) - warmup_steps
    fr = (t / max(r_max_end_step - warmup_steps, 1)).clamp(0.0, 1.0)
    fd = (t / max(d_max_end_step - warmup_steps, 1)).clamp(0.0, 1.0)
    return 1.0 + (r_max - 1.0) * fr, d_max * fd


def _check_limits(r_max: float | Tensor, d_max: float | Tensor) -> None:
    if not isinstance(r_max, Tensor) and not (isinstance(r_max, (int, float)) and r_max >= 1.0):
        raise ValueError(f"batch renorm: r_max must be a number >= 1, got {r_max!r}")
    if not isinstance(d_max, Tensor) and not (isinstance(d_max, (int, float)) and d_max >= 0.0):
        raise ValueError(f"batch renorm: d_max must be a number >= 0, got {d_max!r}")


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    *,
    running_update: str = "std",
    mask: Tensor | None = None,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", 2017, arXiv:1702.03275, Algorithm 1).

    Training, per channel with μ_B and the biased σ²_B over (N, *)::

        σ_B = sqrt(σ²_B + eps),   σ = sqrt(running_var + eps),   μ = running_mean
        r   = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
        d   = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max))
        y   = ((x − μ_B) / σ_B · r + d) · γ + β

    μ_B and σ_B carry gradients as in BatchNorm; r and d are constants for backprop. Then, in
    place, ``μ ← μ + momentum·(μ_B − μ)`` and, with ``running_update="std"`` (the paper), the
    running σ is a moving average of σ_B: ``σ ← σ + momentum·(σ_B − σ)``, stored as
    ``running_var = σ² − eps`` so that eval stays plain BatchNorm
    ``y = (x − running_mean) / sqrt(running_var + eps) · γ + β``. ``running_update="var"`` uses
    torch's BatchNorm update (moving average of the unbiased batch variance) instead.

    ``r_max``/``d_max`` are numbers or tensors (e.g. from :func:`batch_renorm_limits`);
    ``r_max=1, d_max=0`` is exactly BatchNorm in training. Computed as BatchNorm with the
    per-channel stop-gradient affine ``γ·r`` and ``γ·d + β`` (so the gradient is BatchNorm's with
    r, d held fixed): on ``backend="auto"`` from one per-sample statistics pass
    (:func:`sample_moments`; the batch moments pooled from it give r, d too) and one affine pass,
    saving only x; on the other backends (and with a mask) BatchNorm's path plus a no-grad
    statistics pass for r, d (:func:`batch_moments`). A variance past float32's range is kept
    exact in float64 (the output stays right). With a ``reducer`` (synchronized statistics,
    :mod:`normkit.sync`) the moments are computed once, by the engine (one collective about the
    running mean), and r, d come from them.
    """
    eps = check_eps(eps)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var (r and d are defined against them)")
    c = check_channels_first(x, running_mean.numel(), "batch_renorm")
    check_param(weight, c, "weight", "batch_renorm")
    check_param(bias, c, "bias", "batch_renorm")
    if running_update not in ("std", "var"):
        raise ValueError(f"batch_renorm: running_update must be 'std' (paper) or 'var' (torch BN), got {running_update!r}")
    check_momentum(momentum, "batch_renorm")
    _check_limits(r_max, d_max)
    if not training:
        return channel_affine(x, running_mean, running_var, weight, bias, eps)
    per_channel = x.numel() // c
    if per_channel <= 1 and reducer is None:
        raise ValueError(f"batch_renorm: expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    view = (x.shape[0], c, 1, trailing_numel(x))
    m4 = canonical_mask(mask, x, view)
    sd = accumulation_dtype(x.dtype, stats_dtype)
    z = fast = None
    rescued = False
    count: Tensor | float = float(per_channel) if m4 is None else m4.sum((0, 2, 3)).to(sd)
    if reducer is not None:  # normalized once with the global moments; the affine r, d follow
        z, mean_b, var_b, count = normalize_view(
            x.reshape(view), None, None, (0, 2, 3), center=True, eps=eps, mask=m4, reducer=reducer,
            stats_dtype=stats_dtype, shift=running_mean, with_count=True,
        )
        mean_b, var_b, count = mean_b.reshape(c), var_b.reshape(c), count.reshape(c)
    elif m4 is None and moments_fast_path(backend, x):
        # "auto": BatchNorm itself from per-sample moments (one statistics pass, one affine pass; measured
        # faster than ATen's CPU BatchNorm + a statistics pass); the batch moments carry the gradient
        sm, sv = sample_moments(x, stats_dtype)
        fast = pooled_moments(sm, sv)
        mean_b, var_b = fast[0].detach(), fast[1].detach()
    elif m4 is None:
        mean_b, var_b, rescued = batch_moments(x, stats_dtype)
    else:
        with torch.no_grad():
            mean_b, var_b = moments(x.detach().reshape(view).to(sd), (0, 2, 3), mask=m4)
            mean_b, var_b = mean_b.reshape(c), var_b.reshape(c)
    with torch.no_grad():
        std_b = torch.sqrt(var_b + eps)
        std = torch.sqrt(running_var.to(std_b.dtype) + eps)
        rmax = torch.as_tensor(r_max, dtype=std_b.dtype, device=x.device)
        dmax = torch.as_tensor(d_max, dtype=std_b.dtype, device=x.device)
        r = torch.clamp(std_b / std, 1.0 / rmax, rmax)
        d = torch.clamp((mean_b.to(std.dtype) - running_mean.to(std.dtype)) / std, -dmax, dmax)
    if weight is None:
        w_eff, b_eff = r.to(sd), d.to(sd)
    else:
        w_eff = weight * r.to(weight.dtype)
        b_eff = weight * d.to(weight.dtype)
    if bias is not None:
        b_eff = b_eff + bias.to(b_eff.dtype)
    if z is not None:
        shape = (1, c, 1, 1)
        y = (z * w_eff.reshape(shape).to(z.dtype) + b_eff.reshape(shape).to(z.dtype)).reshape(x.shape)
    elif fast is not None:
        scale, shift = bn_coefficients(fast[0], fast[1], w_eff, b_eff, eps)
        y = sample_affine(x, scale.reshape(1, c), shift.reshape(1, c), moments_of=sm)
    else:
        # BatchNorm with the stop-gradient affine γ·r, γ·d + β: ATen's fused op on "auto" (one pass
        # forward, saves only x); an overflowed variance takes the engine's overflow-safe eager path
        y = batch_norm(
            x, None, None, w_eff, b_eff, True, 0.0, eps, mask=mask, stats_dtype=stats_dtype,
            backend="eager" if rescued else backend,
        )
    with torch.no_grad():
        running_mean.lerp_(mean_b.to(running_mean.dtype), momentum)
        if running_update == "std":
            new_std = std.lerp(std_b, momentum)
            running_var.copy_((new_std * new_std - eps).clamp_min(0.0).to(running_var.dtype))
        else:
            running_var.lerp_((var_b * (count / (count - 1))).to(running_var.dtype), momentum)
    return y
