"""Location-aware Adaptive Normalization (LOAN): SPADE-style modulation from a static, location-wise condition map."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from normkit.functional._core import check_channels_first, check_eps, check_float, check_param
from normkit.functional.aten import checked, finite_stats
from normkit.functional.batch_norm import batch_norm, instance_norm
from normkit.kernels.canonical import safe_rstd
from normkit.stats import Reducer, SumSpec, accumulation_dtype, moments_from_sums, synced_sums

FREE_NORMS = ("batch", "instance", "none")


def _check_conv(w: Tensor, b: Tensor | None, c_out: int, c_in: int, name: str) -> None:
    check_float(w, f"{name}_weight")
    if w.dim() != 4 or w.shape[0] != c_out or w.shape[1] != c_in or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(f"loan: {name}_weight must be a ({c_out}, {c_in}, k, k) conv weight with odd k, got {tuple(w.shape)}")
    check_param(b, c_out, f"{name}_bias", "loan")


def loan(
    x: Tensor,
    cond: Tensor,
    gamma_weight: Tensor,
    gamma_bias: Tensor | None,
    beta_weight: Tensor,
    beta_bias: Tensor | None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    cond_running_mean: Tensor | None = None,
    cond_running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    free_norm: str = "batch",
    reducer: Reducer | None = None,
    backend: str | None = None,
) -> Tensor:
    """LOAN: ``y = norm(x) · (1 + γ(c)) + β(c)`` with γ, β predicted per location from a condition map.

    Shams Eddin, Roscher & Gall, "Location-aware Adaptive Normalization: A Deep Learning Approach for
    Wildfire Danger Forecasting", IEEE TGRS 2023, arXiv:2212.08208. Official code
    ``HakamShams/LOAN/models/CNN.py::LOAN`` (commit a487d85):

        x̂    = BN_{affine=False}(x)                   ``free_norm='batch'`` (BatchNorm3d over (N, D, H, W))
        a    = ReLU(BN_{affine=False}(c))             the condition is batch-normalized too (own running stats)
        γ, β = conv_k(a), conv_k(a)                   two separate k×k convs, zero padding k // 2
        y    = x̂ · (1 + γ) + β                        γ, β broadcast along the time axis D of 5-D input

    Shapes: ``x`` ``(N, C, H, W)`` with ``cond`` ``(N, Cc, H, W)``; ``x`` ``(N, C, D, H, W)`` (the official
    layout, D = time) with the static ``cond`` ``(N, Cc, H, W)``; or ``x`` ``(N, C, L)`` with
    ``cond`` ``(N, Cc, L)`` (treated as width 1). ``cond`` must have x's trailing spatial size (the
    official code does not resize it; the SPADE-style interpolation is commented out there).

    ``free_norm``: ``"batch"`` (official), ``"none"`` (the official ``norm=False``, used for its second
    LOAN layer: modulate the raw features), or ``"instance"`` (per-sample statistics, SPADE's option;
    not in the LOAN code). BN layers use batch statistics when ``training`` or when no running buffers
    are given, else the running statistics; in training the given buffers are updated in place
    (torch's convention: ``momentum`` weights the new batch, running_var gets the unbiased variance).
    """
    eps = check_eps(eps)
    if free_norm not in FREE_NORMS:
        raise ValueError(f"loan: free_norm must be one of {FREE_NORMS}, got {free_norm!r}")
    c = check_channels_first(x, None, "loan")
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"loan expects x of shape (N, C, H, W), (N, C, D, H, W) or (N, C, L), got {tuple(x.shape)}")
    check_float(cond, "cond")
    spatial = tuple(x.shape[-1:]) if x.dim() == 3 else tuple(x.shape[-2:])
    if cond.dim() != 2 + len(spatial) or cond.shape[0] != x.shape[0] or tuple(cond.shape[2:]) != spatial:
        want = ", ".join(str(s) for s in spatial)
        raise ValueError(
            f"loan expects cond of shape (N={x.shape[0]}, Cc, {want}) for x of shape {tuple(x.shape)}, got {tuple(cond.shape)}"
        )
    cc = cond.shape[1]
    _check_conv(gamma_weight, gamma_bias, c, cc, "gamma")
    _check_conv(beta_weight, beta_bias, c, cc, "beta")

    use_batch = training or running_mean is None or running_var is None
    use_batch_c = training or cond_running_mean is None or cond_running_var is None
    if reducer is not None and (use_batch or use_batch_c):
        # synchronized: both BNs' sums in ONE packed collective
        xn, cn = _synced_bns(
            x if free_norm == "batch" and use_batch else None, cond if use_batch_c else None,
            running_mean, running_var, cond_running_mean, cond_running_var, momentum, eps, reducer,
        )
        if xn is None:
            xn = _free(x, running_mean, running_var, use_batch, momentum, eps, free_norm, backend)
        if cn is None:
            cn = batch_norm(cond, cond_running_mean, cond_running_var, None, None, False, momentum, eps, backend=backend)
    else:
        xn = None
        cn = batch_norm(
            cond, cond_running_mean, cond_running_var, None, None, use_batch_c, momentum, eps, backend=_safe(cond, backend),
        )
    a = TF.relu(cn)
    a4 = (a.unsqueeze(-1) if a.dim() == 3 else a).to(gamma_weight.dtype)  # bf16 input, fp32 convs: as every norm
    # the scale 1 + γ straight from the γ conv (the 1 added to its bias: C values, not a full-size pass)
    one = torch.ones(c, dtype=gamma_weight.dtype, device=gamma_weight.device)
    gamma = TF.conv2d(a4, gamma_weight, one if gamma_bias is None else gamma_bias + 1, padding=gamma_weight.shape[-1] // 2)
    beta = TF.conv2d(a4, beta_weight, beta_bias, padding=beta_weight.shape[-1] // 2)
    if x.dim() == 3:
        gamma, beta = gamma.squeeze(-1), beta.squeeze(-1)
    elif x.dim() == 5:
        gamma, beta = gamma.unsqueeze(2), beta.unsqueeze(2)
    if xn is None and free_norm == "batch" and _fast_ok(x, gamma, running_mean, running_var):
        y = _bn_modulate(x, gamma, beta, running_mean, running_var, use_batch, momentum, eps)
        if y is not None:
            return y
        backend = "eager" if backend in (None, "auto") else backend  # ATen's statistics overflowed
    if xn is None:
        xn = _free(x, running_mean, running_var, use_batch, momentum, eps, free_norm, _safe(x, backend))
    return xn * gamma.to(xn.dtype) + beta.to(xn.dtype)  # gamma holds 1 + γ


def _safe(t: Tensor, backend: str | None) -> str | None:
    """The backend for a BN whose statistics must not overflow: ``"auto"`` checks ATen's statistics only
    from :data:`normkit.functional.aten.ATEN_CHECK_MIN_NUMEL` elements up; below that (and after this
    layer's fast path saw an overflow) normkit's eager math runs, which is overflow-safe and costs
    nothing that matters at that size."""
    if backend in (None, "auto") and not torch.compiler.is_compiling() and not checked(t):
        return "eager"
    return backend


def _free(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, use_batch: bool, momentum: float, eps: float,
    free_norm: str, backend: str | None,
) -> Tensor:
    """The parameter-free normalization of x (the reference path)."""
    if free_norm == "batch":
        return batch_norm(x, running_mean, running_var, None, None, use_batch, momentum, eps, backend=backend)
    if free_norm == "instance":
        return instance_norm(x, eps=eps, backend=backend)
    return x


def _fast_ok(x: Tensor, gamma: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    return (
        not torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.float64)
        and gamma.dtype == x.dtype
        and x.numel() > x.shape[1]
        and not any(t is not None and t.requires_grad for t in (running_mean, running_var))
    )


def _bn_modulate(
    x: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    use_batch: bool, momentum: float, eps: float,
) -> Tensor | None:
    """``BN(x)·scale + β`` (``scale = 1 + γ``) as one autograd Function: ATen's BN statistics (and
    running-statistics update), the modulation written in place into the normalized tensor (one
    ``addcmul``), and a closed-form backward that saves x and the scale only (x̂ is recomputed). None
    where ATen's statistics overflowed (the running buffers are then restored and the caller takes
    normkit's overflow-safe path)."""
    c = x.shape[1]
    if use_batch:
        old = None if running_mean is None or running_var is None else (running_mean.clone(), running_var.clone())
        with torch.no_grad():
            xn, mean, rstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
        if not finite_stats(rstd):
            if old is not None:
                with torch.no_grad():
                    running_mean.copy_(old[0])
                    running_var.copy_(old[1])
            return None
    else:
        mean = running_mean.to(x.dtype)
        rstd = torch.rsqrt(running_var.to(x.dtype) + eps)
        shape = (1, c) + (1,) * (x.dim() - 2)
        with torch.no_grad():
            xn = (x - mean.reshape(shape)) * rstd.reshape(shape)
    return _BNModulateFn.apply(x, gamma, beta, xn, mean, rstd, use_batch, eps)


class _BNModulateFn(torch.autograd.Function):
    """``y = x̂·scale + β`` with ``x̂ = (x − μ)·r`` (batch or running statistics, given) and ``scale = 1 + γ``.

    Backward (batch statistics; means over N and the positions per channel)::

        ĝ = ∂y·scale,   ∂x = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))     (eval: ∂x = r·ĝ)
        ∂scale = ∂y·x̂,  ∂β = ∂y                                  (summed over D for 5-D x)

    in six input-sized passes: x̂, ∂scale, ĝ, ĝ·x̂ (summed, with ĝ), then ∂x as
    ``addcmul(−r·mean(ĝ), x̂, −r·mean(ĝ·x̂))`` plus ``ĝ·r`` in place. Saves x and the scale (x̂ is
    recomputed). A double backward recomputes through the plain formula.
    """

    @staticmethod
    def forward(ctx, x, scale, beta, xn, mean, rstd, use_batch, eps):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.cfg = (use_batch, eps)
        return torch.addcmul(beta, xn, scale, out=xn)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, scale, mean, rstd = ctx.saved_tensors
        use_batch, eps = ctx.cfg
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        dims = (0, *range(2, x.dim()))
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the plain formula, differentiable
            if use_batch:
                var, mu = torch.var_mean(x, dims, correction=0, keepdim=True)
                xh = (x - mu) * torch.rsqrt(var + eps)
            else:
                xh = (x - mean.reshape(shape)) * rstd.reshape(shape)
            g = gy * scale
            dx = torch.autograd.grad(xh, x, g, create_graph=True)[0] if need[0] else None
            dscale = (gy * xh).sum_to_size(scale.shape) if need[1] else None
            dbeta = gy.sum_to_size(scale.shape) if need[2] else None
            return dx, dscale, dbeta, None, None, None, None, None
        m, r = mean.reshape(shape), rstd.reshape(shape)
        xh = torch.addcmul(-m * r, x, r)  # (x − μ)·r in one pass
        dscale = (gy * xh).sum_to_size(scale.shape) if need[1] else None
        dbeta = gy.sum_to_size(scale.shape) if need[2] else None
        dx = None
        if need[0]:
            g = gy * scale  # ĝ
            if use_batch:
                n = x.numel() // x.shape[1]
                gm = g.sum(dims, keepdim=True) / n
                proj = torch.mul(g, xh).sum(dims, keepdim=True) / n
                dx = torch.addcmul(-r * gm, xh, -r * proj, out=xh).addcmul_(g, r)
            else:
                dx = g.mul_(r)
        return dx, dscale, dbeta, None, None, None, None, None


def _synced_bns(
    x: Tensor | None, cond: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
    cond_running_mean: Tensor | None, cond_running_var: Tensor | None, momentum: float, eps: float, reducer: Reducer,
) -> tuple[Tensor | None, Tensor | None]:
    """Training-mode BNs of x and of the condition over every process, with ONE packed collective of
    ``(n, Σ(t − K), Σ(t − K)²)`` per channel for both (:func:`normkit.stats.synced_sums`), taken about a
    shift ``K`` common to every process: each BN's synchronized mean of the layer's previous call (kept by
    the module's reducer; the running mean for a reducer without memory; on a first call the exact global
    mean from one more collective) — no ``E[x²] − E[x]²`` cancellation. The running buffers get the
    global moments, as :func:`normkit.functional.batch_norm`."""
    items = [(t, rm, rv) for t, rm, rv in ((x, running_mean, running_var), (cond, cond_running_mean, cond_running_var))
             if t is not None]
    specs = []
    for t, rm, _ in items:
        xf = t.to(accumulation_dtype(t.dtype))
        specs.append(SumSpec(xf, (0, *range(2, xf.dim())), None, rm))
    outs = []
    for (t, rm, rv), spec, sums in zip(items, specs, synced_sums(specs, reducer)):
        mean, var, count = moments_from_sums(sums)
        xf, dims = spec.x, spec.dims
        r = safe_rstd(xf, dims, var, eps, mean=mean, reducer=reducer)
        outs.append(((xf - mean) * r).to(t.dtype))
        if rm is not None and rv is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                rm.lerp_(mean.reshape(-1).to(rm.dtype), momentum)
                rv.lerp_(unbiased.reshape(-1).to(rv.dtype), momentum)
    it = iter(outs)
    return (next(it) if x is not None else None), (next(it) if cond is not None else None)
