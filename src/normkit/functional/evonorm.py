"""EvoNorm-B0 and EvoNorm-S0 over channels-first ``(N, C, *spatial)`` input.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", 2020, arXiv:2004.02967.
The math follows the official TensorFlow code (``tensorflow/tpu``,
``models/official/resnet/resnet_model.py``: ``evonorm``, ``_batch_std``, ``_instance_std``,
``_group_std``); the module docstrings in :mod:`normkit.nn.evonorm` list the differences to timm.

Default path (:mod:`normkit.functional._closed_form`): one autograd function per layer with a
closed-form backward that saves only x plus O(N·C) statistics. On CPU with normkit's C++ kernels
built (backends ``"auto"`` and ``"kernels"``) its forward and backward are the fused kernels of
``kernels/csrc/evonorm.cpp`` (two passes over x per direction for B0 in training, one memory pass
plus one from cache otherwise); elsewhere (no compiler, other devices, ``"native"``) the forward
takes its statistics from the engine (``normalize_view``, whose fresh output buffer is then
overwritten in place) and the backward is a few ATen passes. Under ``torch.compile`` with
``backend="kernels"`` the kernels are the operators ``torch.ops.normkit.evonorm_b0`` /
``evonorm_s0`` (autograd registered here, beside the plain formulas their double backward
replays); with other backends the compiler traces the plain formula. ``backend="eager"`` runs the
plain formulas below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit import backend as _backend
from normkit.functional._closed_form import affine, combine_, nc_dot, nc_sum, param_grad, route
from normkit.functional._core import (
    channel_view,
    check_channels_first,
    check_eps,
    check_momentum,
    check_param,
    normalize_view,
    trailing_numel,
)
from normkit.functional._replay import replay_grads
from normkit.kernels import cpu as _cpu
from normkit.kernels import ops as _ops
from normkit.kernels.canonical import safe_rstd
from normkit.stats import Reducer, accumulation_dtype, moments, reduced_moments


def _b0_math(
    x: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    v: Tensor,
    training: bool,
    eps: float,
    stats_dtype: torch.dtype | None,
    reducer: Reducer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The plain formula; returns ``(y, Var_B, count)`` (count: the global one with a reducer)."""
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xf = x.to(sd)
    spatial = tuple(range(2, x.dim()))
    batch = (0, *spatial)
    if training:  # gradients flow through the batch variance (as in TF); synchronized with a reducer
        if reducer is None:
            (mean_b, var_b), count = moments(xf, batch), xf.new_full((1,), x.numel() // x.shape[1])
        else:  # shifted sums (n, Σ(x−K), Σ(x−K)²) in one collective (normkit.stats.synced_sums)
            mean_b, var_b, count = reduced_moments(xf, batch, reducer=reducer)
        r_b = safe_rstd(xf, batch, var_b, eps, mean=mean_b, reducer=reducer)
    else:
        var_b, count = channel_view(running_var, xf).to(sd), xf.new_ones(())
        r_b = torch.rsqrt(var_b + eps)
    mean_i, var_i = moments(xf, spatial)
    r_i = safe_rstd(xf, spatial, var_i, eps, mean=mean_i)
    # x / max(s_B, v·x + s_I) with numerator and denominator times k = min(r_B, r_I) (y does not depend on
    # k: detached): every term and derivative stays O(1)–O(|x|) where s = 1/r and 1/r² would overflow
    k = torch.minimum(r_b, r_i).detach()
    den = torch.maximum(k / r_b, channel_view(v, xf).to(sd) * xf * k + k / r_i)
    y = affine(xf * k / den, weight, bias)
    return y.to(x.dtype), var_b, count.reshape(-1)[:1]


def _b0_plain(x: Tensor, w: Tensor | None, b: Tensor | None, v: Tensor, running_var: Tensor | None,
              training: bool, eps: float) -> Tensor:
    return _b0_math(x, running_var, w, b, v, training, eps, None)[0]


def _route(backend: str | None, x: Tensor, stats_dtype: torch.dtype | None, *params: Tensor | None) -> tuple[str, bool]:
    """:func:`~normkit.functional._closed_form.route`, and whether the closed form runs as
    csrc/evonorm.cpp's kernels: with backend ``"auto"`` or ``"kernels"`` (``"native"`` keeps the ATen
    closed form) on a CPU input the kernels take (dtype, layout, built).

    With the kernels ``"auto"`` takes the closed form at any size, not only from
    :data:`~normkit.functional._closed_form.FAST_MIN_NUMEL` elements: a kernel call is cheaper than the
    plain formula even at 2×16×8×8 (fwd+bwd ~0.4–0.5 ms against ~0.7–1.2 ms, 2 threads).
    """
    impl = route(backend, x, "evonorm", stats_dtype)
    name = _backend.get_backend() if backend is None else backend
    small_auto = impl == "eager" and name == "auto" and not torch.compiler.is_compiling()
    if (impl == "fast" or small_auto) and name in ("auto", "kernels") and stats_dtype in (None, x.dtype) \
            and _ops.accepts(x, *params):
        _backend.note("evonorm", "kernels")  # for backend.record() (the `runs` column of `normkit kernels`)
        return "fast", True
    return impl, False


def _compiled_kernel_ok(impl: str, backend: str | None, x: Tensor, stats_dtype: torch.dtype | None,
                        *params: Tensor | None) -> bool:
    """Under ``torch.compile`` with ``backend="kernels"``: the operators ``torch.ops.normkit.evonorm_*``,
    kept as nodes of the user's graph (with ``"auto"`` the compiler traces and fuses the plain formula)."""
    name = _backend.get_backend() if backend is None else backend
    return (
        impl == "eager" and name == "kernels" and torch.compiler.is_compiling()
        and stats_dtype in (None, x.dtype) and _ops.accepts(x, *params)
    )


def _grads(need: tuple[bool, ...], gy: Tensor, inputs: tuple, plain, kernel_bwd, kernel_args: tuple, aten) -> tuple:  # noqa: ANN001
    """``(∂x, None, ∂w, ∂b, ∂v)`` of EvoNorm-B0/S0 (``need``: which of (x, -, w, b, v) want one).

    ``inputs`` = (x, w, b, v). A double backward (grad mode on) differentiates ``plain(x, w, b, v)``;
    otherwise ``kernel_bwd(gy, x, w, v, *kernel_args, want_w, want_b, want_v)`` runs the C++ backward
    (the wrapper of :mod:`normkit.kernels.cpu` in eager, the operator in a compiled graph; None: the
    forward ran without the kernels) or ``aten()`` the ATen closed form.
    """
    x, weight, bias, v = inputs
    if torch.is_grad_enabled():  # create_graph=True: differentiate the plain formula
        dx, dw, db, dv = replay_grads(plain, inputs, (need[0], need[2], need[3], need[4]), gy)
        return dx, None, dw, db, dv
    if kernel_bwd is None:
        return aten()
    want = (weight is not None and need[2], bias is not None and need[3], need[4])
    dx, *rest = kernel_bwd(gy, x, weight, v, *kernel_args, *want)
    # the kernel returns an empty tensor for a gradient not asked for; param_grad makes it None
    dw, db, dv = (param_grad(t, p, w) for t, p, w in zip(rest, (weight, bias, v), want))
    return dx if need[0] else None, None, dw, db, dv


class _B0Fn(torch.autograd.Function):
    """EvoNorm-B0 with a closed-form backward (saves x plus O(N·C) statistics).

    With s_I = sqrt(Var_I + eps) per (n, c), a = sqrt(Var_B + eps) per c, den = max(a, v·x + s_I),
    u = x/den, m = [v·x + s_I > a] (ties go to a, as TF's ``tf.maximum(left, right)``),
    T = g/den and W = m·T·u::

        ∂L/∂x = γ·T − γ·v·W + (x − μ_I)·P + (x − μ_B)·Q
        P     = −γ·Σ_L W / (L·s_I)                              (through s_I)
        Q     = −γ·Σ_{N,L} (1 − m)·T·u / (N·L·a)                (through a; training only)
        ∂L/∂v = −γ·Σ_{N,L} W·x,   ∂L/∂γ = Σ_{N,L} g·u,   ∂L/∂β = Σ_{N,L} g

    Var_B comes from the per-(n, c) moments by the law of total variance (exact, float64 on
    O(N·C) values), so the forward reads x once for its statistics.
    """

    @staticmethod
    def forward(ctx, x, running_var, weight, bias, v, training, eps, backend, kernel):  # noqa: ANN001, ANN205
        ctx.cfg = (bool(training), eps, kernel)
        if kernel:  # csrc/evonorm.cpp
            rv = None if training else running_var.detach().to(x.dtype)
            y, var_b, mean_b, a, mean_i, std_i = _cpu.evonorm_b0_forward(x, rv, weight, bias, v, training, eps)
            ctx.save_for_backward(x, None if training else var_b, weight, bias, v, std_i, a, mean_i, mean_b)
            ctx.mark_non_differentiable(var_b)
            return y, var_b
        n, c = x.shape[:2]
        length = trailing_numel(x)
        x4 = x.reshape(n, c, 1, length)
        y4, mean_i, var_i = normalize_view(x4, None, None, (2, 3), center=True, eps=eps, backend=backend)
        s_i = safe_rstd(x4, (2, 3), var_i, eps, mean=mean_i).reciprocal()  # (N, C, 1, 1)
        if training:
            s64, mu64 = s_i.double(), mean_i.double()
            vi64 = torch.where(torch.isfinite(var_i), var_i.double(), s64.square() - eps)
            mu_b = mu64.mean(0, keepdim=True)
            var_b64 = vi64.mean(0, keepdim=True) + (mu64 - mu_b).square().mean(0, keepdim=True)
            a = (var_b64 + eps).sqrt().to(x.dtype)
            var_b = var_b64.to(x.dtype)
        else:
            var_b = running_var.detach().to(x.dtype).reshape(1, c, 1, 1).clone()  # saved: the buffer may change
            a = (var_b + eps).sqrt()
            mu_b = None
        v4 = v.to(x.dtype).reshape(1, c, 1, 1)
        torch.addcmul(s_i, x4, v4, out=y4)  # v·x + s_I: the engine's output buffer reused
        torch.maximum(y4, a, out=y4)
        torch.div(x4, y4, out=y4)
        if weight is not None and bias is not None:
            torch.addcmul(bias.to(x.dtype).reshape(1, c, 1, 1), y4, weight.to(x.dtype).reshape(1, c, 1, 1), out=y4)
        elif weight is not None:
            y4.mul_(weight.to(x.dtype).reshape(1, c, 1, 1))
        elif bias is not None:
            y4.add_(bias.to(x.dtype).reshape(1, c, 1, 1))
        ctx.save_for_backward(x, None if training else var_b, weight, bias, v, s_i, a, mean_i, mu_b)
        ctx.mark_non_differentiable(var_b)
        return y4.reshape(x.shape), var_b

    @staticmethod
    def backward(ctx, gy, _gvar):  # noqa: ANN001, ANN205
        return *_b0_grads(ctx, gy, _cpu.evonorm_b0_backward, ctx.needs_input_grad), None, None, None, None


def _b0_grads(ctx, gy: Tensor, kernel_bwd, need: tuple[bool, ...]) -> tuple:  # noqa: ANN001
    """:func:`_grads` of EvoNorm-B0 from the saved tensors of :class:`_B0Fn` or of the operator
    ``normkit::evonorm_b0`` (the same ones)."""
    x, var_run, weight, bias, v, s_i, a, mean_i, mu_b = ctx.saved_tensors
    training, eps, kernel = ctx.cfg
    return _grads(
        need, gy, (x, weight, bias, v), lambda x, w, b, v: _b0_plain(x, w, b, v, var_run, training, eps),
        kernel_bwd if kernel else None, (mean_i, s_i, mu_b, a, training),
        lambda: _b0_aten_grads(x, weight, bias, v, s_i, a, mean_i, mu_b, training, need, gy),
    )


def _b0_aten_grads(x, weight, bias, v, s_i, a, mean_i, mu_b, training, need, gy):  # noqa: ANN001, ANN202
    """The closed-form backward of :class:`_B0Fn` in ATen ops (no C++ kernels)."""
    n, c = x.shape[:2]
    length = trailing_numel(x)
    dt = x.dtype
    x4 = x.reshape(n, c, 1, length)
    g4 = gy.contiguous().reshape(n, c, 1, length)
    v4 = v.to(dt).reshape(1, c, 1, 1)
    d = torch.addcmul(s_i, x4, v4)  # v·x + s_I
    m = torch.gt(d, a, out=torch.empty_like(d))  # a float mask: multiplying by a bool one casts it first (2–3× slower)
    torch.maximum(d, a, out=d)  # den
    t = g4 / d  # T = g/den
    torch.div(x4, d, out=d)  # u = x/den
    e1 = nc_dot(g4, d) if weight is not None and need[2] else None  # Σ_L g·u
    d.mul_(t)  # T·u
    h_all = nc_sum(d).double() if training else None
    d.mul_(m)  # W = m·T·u
    h_m = nc_sum(d).double()
    ev = nc_dot(d, x4).double() if need[4] else None
    gam = torch.ones(1, c, dtype=torch.float64, device=x.device) if weight is None else weight.double().reshape(1, c)
    s64 = s_i.double().reshape(n, c)
    # coefficients ×s_I (so every product below is O(1) at input scales of 1e±30), float64
    p_s = -gam * h_m / length  # P·s_I
    c_x, const = p_s, -mean_i.double().reshape(n, c) * p_s
    if training:
        a64 = a.double().reshape(1, c)
        q = -gam * (h_all - h_m).sum(0, keepdim=True) / (n * length * a64)
        c_x = c_x + q * s64
        const = const - mu_b.double().reshape(1, c) * q * s64
    dx = None
    if need[0]:
        shape = (n, c, 1, 1)
        dx = combine_(
            t, (gam * s64).reshape(shape), [(d, (-gam * v.double().reshape(1, c) * s64).reshape(shape)),
                                            (x4, c_x.reshape(shape))],
            const.reshape(shape), s64.reciprocal().reshape(shape),
        ).reshape(x.shape)
    dw = param_grad(None if e1 is None else e1.sum(0), weight, need[2])
    db = param_grad(g4.sum((0, 2, 3)), bias, need[3])
    dv = param_grad(None if ev is None else -gam.reshape(c) * ev.sum(0), v, need[4])
    return dx, None, dw, db, dv


def evonorm_b0(
    x: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    apply_act: bool = True,
    unbiased_running_var: bool = False,
    reducer: Reducer | None = None,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """EvoNorm-B0, the batch-dependent EvoNorm (Liu et al. 2020, arXiv:2004.02967).

    With ``apply_act=True``::

        s_B = sqrt(Var_{N,*}(x) + eps)            training: batch variance (biased, with gradient)
            = sqrt(running_var + eps)             eval
        s_I = sqrt(Var_{*}(x) + eps)              per sample and channel, over the spatial dims
        y   = x / max(s_B, v·x + s_I) · γ + β

    In training, ``running_var`` (if given) is updated in place with torch's momentum
    convention ``r ← (1 − momentum)·r + momentum·Var_B`` (TF's ``decay=0.9`` is ``momentum=0.1``),
    with the *biased* batch variance as the official code; ``unbiased_running_var=True`` stores
    the Bessel-corrected variance instead (timm's ``EvoNorm2dB0``).

    ``apply_act=False`` reproduces the official ``nonlinearity=False``: **no normalization**,
    just ``y = x·γ + β`` (``v`` and ``running_var`` are unused and not updated).

    ``reducer`` (training only) makes ``Var_B`` the variance of the whole distributed batch
    (:mod:`normkit.sync`): the sums ``(n, Σ(x−K), Σ(x−K)²)`` go in **one** packed collective, taken
    about a shift ``K`` common to every process — the layer's synchronized batch mean of its previous
    call, kept by the module's reducer (:func:`normkit.stats.synced_sums`); on the first call, or with
    a reducer that keeps no memory, the exact global mean from a first collective (two collectives).
    No ``E[x²] − E[x]²`` cancellation. ``Var_I`` is per sample and stays local.

    Default path: :class:`_B0Fn` (closed-form backward, saves x plus O(N·C) statistics; at a tie
    ``s_B = v·x + s_I`` the gradient goes to s_B, as TF's ``tf.maximum(left, right)``; the
    ``"eager"`` formula uses torch's ``maximum``, which splits it).
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None if running_var is None else running_var.numel(), "evonorm_b0")
    check_param(weight, c, "weight", "evonorm_b0")
    check_param(bias, c, "bias", "evonorm_b0")
    if not apply_act:
        return affine(x, weight, bias)
    if x.dim() < 3:
        raise ValueError(f"evonorm_b0 expects (N, C, *spatial) input with at least 3 dims, got shape {tuple(x.shape)}")
    if v is None:
        raise ValueError("evonorm_b0 with apply_act=True needs the per-channel parameter v")
    check_param(v, c, "v", "evonorm_b0")
    momentum = check_momentum(momentum, "evonorm_b0")
    if not training and running_var is None:
        raise ValueError("evonorm_b0 in eval mode (training=False) needs running_var")
    if training and x.numel() // c <= 1 and reducer is None:
        raise ValueError(f"evonorm_b0: expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    n = x.numel() // c
    training = bool(training)
    if reducer is not None and training:
        y, var_b, count = _b0_math(x, running_var, weight, bias, v, True, eps, stats_dtype, reducer)
        n = count  # the global count, from the same collective
    else:
        impl, kernel = _route(backend, x, stats_dtype, weight, bias, v)
        if impl == "fast" and (running_var is None or not running_var.requires_grad):
            y, var_b = _B0Fn.apply(x, running_var, weight, bias, v, training, eps, backend, kernel)
        elif _compiled_kernel_ok(impl, backend, x, stats_dtype, weight, bias, v):
            rv = None if training else running_var.detach().to(x.dtype)
            y, var_b, *_ = torch.ops.normkit.evonorm_b0(x, rv, weight, bias, v, training, eps)
        else:
            impl = "eager" if impl == "fast" else impl
            key = ("b0", training, eps, stats_dtype, x.dtype, weight is not None, bias is not None)
            y, var_b, _ = _backend.executor(impl, _b0_math, key)(x, running_var, weight, bias, v, training, eps, stats_dtype)
    if training and running_var is not None:
        with torch.no_grad():
            new = var_b.detach().reshape(c)
            if unbiased_running_var:
                new = new * (n / (n - 1))
            running_var.lerp_(new.to(running_var.dtype), momentum)
    return y


def _s0_math(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    v: Tensor,
    eps: float,
    stats_dtype: torch.dtype | None,
) -> Tensor:
    sd = accumulation_dtype(x.dtype, stats_dtype)
    xf = x.to(sd)
    n, c = x.shape[:2]
    xg = xf.reshape(n, num_groups, c // num_groups, trailing_numel(x))
    mean, var = moments(xg, (2, 3))
    r = safe_rstd(xg, (2, 3), var, eps, mean=mean)  # right where the variance overflowed
    rc = r.expand(n, num_groups, c // num_groups, 1).reshape((n, c) + (1,) * (x.dim() - 2))
    y = xf * torch.sigmoid(channel_view(v, xf).to(sd) * xf) * rc
    return affine(y, weight, bias).to(x.dtype)


class _S0Fn(torch.autograd.Function):
    """EvoNorm-S0 with a closed-form backward (saves x plus O(N·G) statistics).

    With z = v·x, s = σ(z), f = x·s, r = 1/sqrt(Var_G + eps) per (n, group), M = (C/G)·L::

        A_nc  = Σ_L g·f,   K_ng = Σ_{c∈g} γ_c·A_nc
        ∂L/∂x = γ·r·(g·s + v·g·x·s·(1 − s)) − r³·(x − μ_G)·K/M      (d f/d x = s + v·x·s·(1 − s))
        ∂L/∂v = Σ_N γ·r·Σ_L g·x²·s·(1 − s),   ∂L/∂γ = Σ_N r·A,   ∂L/∂β = Σ_{N,L} g
    """

    @staticmethod
    def forward(ctx, x, groups, weight, bias, v, eps, backend, kernel):  # noqa: ANN001, ANN205
        ctx.cfg = (groups, eps, kernel)
        if kernel:  # csrc/evonorm.cpp
            y, mean, r = _cpu.evonorm_s0_forward(x, weight, bias, v, groups, eps)
            ctx.save_for_backward(x, weight, bias, v, r, mean)
            return y
        n, c = x.shape[:2]
        length = trailing_numel(x)
        x4 = x.reshape(n, groups, c // groups, length)
        y4, mean, var = normalize_view(x4, None, None, (2, 3), center=True, eps=eps, backend=backend)
        r = safe_rstd(x4, (2, 3), var, eps, mean=mean)  # (N, G, 1, 1)
        scale = r if weight is None else r * weight.to(x.dtype).reshape(1, groups, c // groups, 1)
        torch.mul(x4, v.to(x.dtype).reshape(1, groups, c // groups, 1), out=y4)  # the engine's buffer reused
        y4.sigmoid_().mul_(x4)
        if bias is None:
            y4.mul_(scale)
        else:
            torch.addcmul(bias.to(x.dtype).reshape(1, groups, c // groups, 1), y4, scale, out=y4)
        ctx.save_for_backward(x, weight, bias, v, r, mean)
        return y4.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        return *_s0_grads(ctx, gy, _cpu.evonorm_s0_backward, ctx.needs_input_grad), None, None, None


def _s0_grads(ctx, gy: Tensor, kernel_bwd, need: tuple[bool, ...]) -> tuple:  # noqa: ANN001
    """:func:`_grads` of EvoNorm-S0 from the saved tensors of :class:`_S0Fn` or of the operator
    ``normkit::evonorm_s0`` (the same ones); ``need`` in :class:`_S0Fn`'s argument order."""
    x, weight, bias, v, r, mean = ctx.saved_tensors
    groups, eps, kernel = ctx.cfg
    return _grads(
        need, gy, (x, weight, bias, v), lambda x, w, b, v: _s0_math(x, groups, w, b, v, eps, None),
        kernel_bwd if kernel else None, (mean, r, groups),
        lambda: _s0_aten_grads(x, weight, bias, v, r, mean, groups, need, gy),
    )


def _s0_aten_grads(x, weight, bias, v, r, mean, groups, need, gy):  # noqa: ANN001, ANN202
    """The closed-form backward of :class:`_S0Fn` in ATen ops (no C++ kernels)."""
    n, c = x.shape[:2]
    cg = c // groups
    length = trailing_numel(x)
    dt = x.dtype
    g4 = gy.contiguous().reshape(n, c, 1, length)
    x4 = x.reshape(n, c, 1, length)
    v4 = v.to(dt).reshape(1, c, 1, 1)
    s = (x4 * v4).sigmoid_()  # σ(z)
    gx = g4 * x4
    a = nc_dot(gx, s).double()  # A_nc = Σ_L g·x·s
    if need[0] or need[4]:
        torch.ops.aten.sigmoid_backward(gx, s, grad_input=gx)  # g·x·σ'(z), in place
    ev = nc_dot(gx, x4).double() if need[4] else None
    gam = torch.ones(1, c, dtype=torch.float64, device=x.device) if weight is None else weight.double().reshape(1, c)
    r64 = r.double().reshape(n, groups, 1).expand(n, groups, cg).reshape(n, c)
    dx = None
    if need[0]:  # g·silu'(z) = g·s + v·(g·x·σ'(z)), then the path through r
        k = (gam * a).reshape(n, groups, cg).sum(2, keepdim=True).expand(n, groups, cg).reshape(n, c)
        c_x = -r64.square() * k / (cg * length)  # (r³K/M)/r: O(1)·x at any input scale
        const = -mean.double().reshape(n, groups, 1).expand(n, groups, cg).reshape(n, c) * c_x
        shape = (n, c, 1, 1)
        terms = [(gx, (gam * v.double().reshape(1, c)).expand(n, c).reshape(shape)), (x4, c_x.reshape(shape))]
        dx = combine_(s.mul_(g4), gam.expand(n, c).reshape(shape), terms, const.reshape(shape),
                      r64.reshape(shape)).reshape(x.shape)
    dw = param_grad((r64 * a).sum(0), weight, need[2])
    db = param_grad(g4.sum((0, 2, 3)), bias, need[3])
    dv = param_grad(None if ev is None else (gam * r64 * ev).sum(0), v, need[4])
    return dx, None, dw, db, dv


def evonorm_s0(
    x: Tensor,
    num_groups: int = 32,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    eps: float = 1e-5,
    *,
    apply_act: bool = True,
    stats_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """EvoNorm-S0, the batch-independent EvoNorm (Liu et al. 2020, arXiv:2004.02967).

    With ``apply_act=True``::

        s_G = sqrt(Var_{C/G, *}(x) + eps)          per sample, over each group of C/G channels and the spatial dims
        y   = x · sigmoid(v·x) / s_G · γ + β

    ``num_groups`` must divide C here (the module :class:`normkit.nn.evonorm.EvoNormS0` applies
    TF's rule of lowering the default of 32 until it divides C). ``apply_act=False`` is the
    official ``nonlinearity=False``: **no normalization**, ``y = x·γ + β``. Train and eval agree.

    Default path: :class:`_S0Fn` (group statistics from the engine's GroupNorm kernel,
    closed-form backward, saves x plus O(N·G) statistics).
    """
    eps = check_eps(eps)
    c = check_channels_first(x, None, "evonorm_s0")
    check_param(weight, c, "weight", "evonorm_s0")
    check_param(bias, c, "bias", "evonorm_s0")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"evonorm_s0: num_groups={num_groups!r} must be a positive divisor of the {c} channels")
    if not apply_act:
        return affine(x, weight, bias)
    if v is None:
        raise ValueError("evonorm_s0 with apply_act=True needs the per-channel parameter v")
    check_param(v, c, "v", "evonorm_s0")
    impl, kernel = _route(backend, x, stats_dtype, weight, bias, v)
    if impl == "fast":
        return _S0Fn.apply(x, num_groups, weight, bias, v, eps, backend, kernel)
    if _compiled_kernel_ok(impl, backend, x, stats_dtype, weight, bias, v):
        return torch.ops.normkit.evonorm_s0(x, weight, bias, v, num_groups, eps)[0]
    key = ("s0", num_groups, eps, stats_dtype, x.dtype, weight is not None, bias is not None)
    return _backend.executor(impl, _s0_math, key)(x, num_groups, weight, bias, v, eps, stats_dtype)


# ---------------------------------------------------------------- autograd of the C++ operators
# (torch.ops.normkit.evonorm_b0 / evonorm_s0, defined in normkit.kernels.ops): the same closed form
# as _B0Fn/_S0Fn on the same saved tensors, with the backward operator; a double backward replays
# the plain formula.


def _b0_op_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, _running_var, weight, bias, v, training, eps = inputs
    _, var_b, mean_b, a, mean_i, std_i = output
    ctx.save_for_backward(x, None if training else var_b, weight, bias, v, std_i, a, mean_i, mean_b)
    ctx.cfg = (bool(training), eps, True)


def _b0_op_backward(ctx, gy, *_unused):  # noqa: ANN001, ANN202
    return *_b0_grads(ctx, gy, torch.ops.normkit.evonorm_b0_backward, ctx.needs_input_grad), None, None


def _s0_op_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, v, groups, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, v, rstd, mean)
    ctx.cfg = (groups, eps, True)


def _s0_op_backward(ctx, gy, *_unused):  # noqa: ANN001, ANN202
    need = ctx.needs_input_grad  # the operator's order: (x, weight, bias, v, groups, eps)
    dx, _, dw, db, dv = _s0_grads(ctx, gy, torch.ops.normkit.evonorm_s0_backward, (need[0], False, *need[1:4]))
    return dx, dw, db, dv, None, None


_ops.evonorm_b0.register_autograd(_b0_op_backward, setup_context=_b0_op_setup)
_ops.evonorm_s0.register_autograd(_s0_op_backward, setup_context=_s0_op_setup)
