"""SLAB's RepBN and the progressive LN → RepBN layer (PRepBN), channels-last token norms.

State-dict keys are the official code's (``xinghaochen/SLAB``, ``classification/models/prepbn.py``):
``RepBN`` → ``alpha``, ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``;
``PRepBN`` (official ``LinearNorm(norm1=LayerNorm, norm2=RepBN)``) → ``warm``, ``iter``,
``total_step``, ``norm1.*``, ``norm2.*``. Official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normkit.backend import resolve
from normkit.functional._core import check_momentum, snapshot
from normkit.functional.aten import finite_stats as aten_finite
from normkit.functional.layer_norm import layer_norm
from normkit.functional.rep_batch_norm import (
    _check_tokens,
    prepbn_advance_,
    prepbn_lambda,
    prepbn_mix,
    prepbn_mix_fused,
    rep_batch_norm,
)
from normkit.nn._base import check_module_args, options_repr, sync_reducer
from normkit.nn.batch_norm import BatchNorm
from normkit.nn.layer_norm import LayerNorm
from normkit.registry import Paper, register_norm
from normkit.stats import Reducer, accumulation_dtype
from normkit.sync import ProcessGroupLike

SLAB = Paper(
    "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch Normalization",
    2024,
    "2405.11582",
    "Guo, Chen, Tang, Wang",
)


@register_norm(
    "repbn",
    family="batch",
    paper=SLAB,
    layout="channels_last",
    batch_dependent=True,
    train_eval_differ=True,
    description="BatchNorm over all tokens plus a learnable α·x shortcut; folds into the next linear",
    aliases=("rep_batch_norm",),
)
class RepBN(nn.Module):
    """Re-parameterizable BatchNorm for transformer tokens ``(B, T, C)`` (any ``(N, *, C)``).

    Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
    Re-parameterized Batch Normalization", ICML 2024, arXiv:2405.11582::

        RepBN(x) = BN(x) + α · x        BN over the N·T values of each channel

    Training: batch mean/biased variance, running buffers updated as torch's BatchNorm
    (``momentum`` 0.1 weights the new batch; running_var unbiased). Eval: running statistics,
    so the layer is the per-channel affine :meth:`scale_shift` and folds into the following
    linear layer (:func:`fuse_rep_batch_norm`).

    Defaults are the official classification code's: ``nn.BatchNorm1d(C)`` (eps 1e-5, momentum
    0.1, affine γ=1, β=0) and ``alpha`` of shape ``(1,)`` initialised to 1 (``alpha_init``).
    The official LLaMA variant initialises α, γ and β to 0 instead (``alpha_init=0.0`` and
    ``zero_init=True`` reproduce it). ``momentum=None`` (cumulative average) is not supported.

    ``forward(x, mask)``: optional bool padding mask ``(N, *)`` or broadcastable to ``x``; padded
    tokens are left out of the batch statistics. ``process_group`` (or the lower-level ``reducer``)
    syncs the BN statistics across processes in training (:mod:`normkit.sync`).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        alpha_init: float = 1.0,
        affine: bool = True,
        *,
        zero_init: bool = False,
        reducer: Reducer | None = None,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_module_args(eps, backend)
        momentum = check_momentum(momentum, type(self).__name__, hint=" (no cumulative-average mode)")
        if not math.isfinite(alpha_init):
            raise ValueError(f"alpha_init must be finite, got {alpha_init!r}")
        self.num_features = int(num_features)
        self.alpha_init = float(alpha_init)
        self.zero_init = bool(zero_init)
        self.alpha = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.bn = BatchNorm(
            num_features,
            eps,
            momentum,
            affine,
            True,
            reducer=reducer,
            stats_dtype=stats_dtype,
            channels_last=True,
            backend=backend,
            process_group=process_group,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        self.bn.reset_parameters()
        if self.zero_init and self.bn.affine:
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._forward(x, mask)

    def _forward(
        self, x: Tensor, mask: Tensor | None, commit: Tensor | None = None, scale: Tensor | None = None
    ) -> Tensor:
        """``commit`` (bool 0-dim tensor): in training, apply the running-statistics update only if True.
        ``scale`` (0-dim): return ``scale · RepBN(x)``, folded into γ, β and α (C-sized products)."""
        bn = self.bn
        rm, rv = bn.running_mean, bn.running_var
        if self.training and commit is not None:
            rm, rv = rm.clone(), rv.clone()
        weight, bias, alpha = bn.weight, bn.bias, self.alpha
        if scale is not None:
            weight, bias, alpha = (
                scale_param(weight, scale, self.num_features, x), scale_param(bias, scale, None, x), alpha * scale
            )
        y = rep_batch_norm(
            x,
            rm,
            rv,
            weight,
            bias,
            alpha,
            self.training,
            bn.momentum,
            bn.eps,
            mask=mask,
            reducer=sync_reducer(bn),
            stats_dtype=bn.stats_dtype,
            backend=bn.backend,
        )
        if self.training:
            with torch.no_grad():
                if commit is None:
                    bn.num_batches_tracked.add_(1)
                else:
                    bn.running_mean.copy_(torch.where(commit, rm, bn.running_mean))
                    bn.running_var.copy_(torch.where(commit, rv, bn.running_var))
                    bn.num_batches_tracked.add_(commit.to(bn.num_batches_tracked.dtype))
        return y

    @torch.no_grad()
    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Eval-mode map ``y = x · a + c`` per channel: ``a = γ/√(σ²+eps) + α``, ``c = β − γ·μ/√(σ²+eps)``."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps)
        g = bn.weight if bn.weight is not None else torch.ones_like(inv)
        b = bn.bias if bn.bias is not None else torch.zeros_like(inv)
        return g * inv + self.alpha, b - g * inv * bn.running_mean

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.bn.eps}, momentum={self.bn.momentum}, alpha_init={self.alpha_init}"
        return (
            s
            + (", zero_init=True" if self.zero_init else "")
            + options_repr(self.bn)
        )


def scale_param(p: Tensor | None, scale: Tensor, ones: int | None, like: Tensor) -> Tensor | None:
    """``scale · p`` in ``p``'s dtype; a missing weight (``ones`` = its size) is 1, a missing bias stays None."""
    if p is None:
        return None if ones is None else scale.to(like.dtype).expand(ones)
    return scale.to(p.dtype) * p


@torch.no_grad()
def fuse_rep_batch_norm(norm: RepBN | PRepBN, linear: nn.Linear) -> nn.Linear:
    """Fold an eval-mode RepBN into the ``nn.Linear`` that consumes its output (SLAB's inference re-parameterization).

    ``linear(RepBN(x)) = linear'(x)`` with ``W' = W · diag(a)``, ``b' = b + W · c`` where
    ``(a, c) = norm.scale_shift()`` (running statistics, i.e. eval mode). For a :class:`PRepBN`
    its ``norm2`` is fused (the official eval path uses RepBN only). Returns a new ``nn.Linear``
    with a bias; ``linear`` is not modified.
    """
    rep = norm.norm2 if isinstance(norm, PRepBN) else norm
    if not isinstance(rep, RepBN) or not isinstance(linear, nn.Linear):
        raise TypeError(
            f"fuse_rep_batch_norm expects (RepBN | PRepBN, nn.Linear), got ({type(norm).__name__}, {type(linear).__name__})"
        )
    if linear.in_features != rep.num_features:
        raise ValueError(f"fuse_rep_batch_norm: linear.in_features={linear.in_features} != norm features {rep.num_features}")
    a, c = rep.scale_shift()
    w = linear.weight
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True, device=w.device, dtype=w.dtype)
    fused.weight.copy_(w * a.to(w.dtype))
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, device=w.device, dtype=w.dtype)
    fused.bias.copy_(bias + w @ c.to(w.dtype))
    return fused


@register_norm(
    "prepbn",
    family="batch",
    paper=SLAB,
    layout="channels_last",
    batch_dependent=True,
    train_eval_differ=True,
    description="progressive LayerNorm → RepBN: λ·LN + (1−λ)·RepBN with λ decaying linearly to 0",
    aliases=("progressive_repbn",),
)
class PRepBN(nn.Module):
    """Progressive re-parameterized BatchNorm: LayerNorm that turns into RepBN during training.

    Guo et al., SLAB, ICML 2024, arXiv:2405.11582, and the official ``LinearNorm``::

        training, while warm > 0:   y = LN(x);                                 warm ← warm − 1
        training, afterwards:       λ = r0 · iter / total_step  (before the decrement)
                                    y = λ · LN(x) + (1 − λ) · RepBN(x);         iter ← max(iter − 1, 0)
        eval:                       y = RepBN(x)            (running statistics, official code)

    so λ falls linearly from ``r0`` to 0 over ``total_step`` training forward calls after
    ``warm`` calls of pure LN, then stays 0. The counters (``warm``, ``iter``, ``total_step``,
    int64 buffers as in the official code) are in the state dict, so a checkpoint resumes the
    schedule exactly. They count *training forward calls*, not optimizer steps: with gradient
    accumulation set ``accumulation_steps`` to the number of calls per step (the official LLaMA
    variant uses 16), which advances the counters on every k-th call (extra ``num_step``
    buffer, only registered when k > 1). λ is computed with tensor ops (no host sync in the
    schedule itself), so ``torch.compile(fullgraph=True)`` traces it without graph breaks.

    Defaults: ``warm=0``, ``total_step=300000``, ``r0=1.0`` (``LinearNorm``'s defaults; SLAB-DeiT
    and SLAB-Swin use ``total_step=60000``, CSwin 120000), LayerNorm eps ``ln_eps=1e-6`` (DeiT/PVT
    configs; Swin/CSwin use torch's 1e-5), RepBN as :class:`RepBN` (eps 1e-5, momentum 0.1, α=1).

    Divergences / switches:

    * ``eval_mix=False`` (official): eval uses RepBN alone even while the schedule is unfinished,
      so a mid-training eval does not match the training-mode function. ``eval_mix=True``
      evaluates ``λ·LN + (1−λ)·RepBN`` with the current λ (LN alone during warm-up).
    * Eager mode follows the official control flow exactly (one host read of ``warm > 0`` per
      training call, and one of λ after warm-up; RepBN is not run during warm-up). After warm-up the
      mix is computed with λ and 1 − λ folded into each branch's affine parameters (C-sized products;
      in training, float32/float64 without mask or sync: one autograd node — with backend ``"auto"`` and
      normkit's C++ kernels :class:`~normkit.functional.rep_batch_norm._RepBNKernelFn`, two reads of x
      forward and two of ∂L/∂y and x backward, else ATen's LayerNorm with the RepBN branch folded into its
      bias, :class:`~normkit.functional.rep_batch_norm._PRepBNMixFn`); same values and gradients as the
      formula, at the cost of about one LayerNorm plus one pass. Under ``torch.compile`` both branches are
      computed and selected with ``torch.where``: outputs, counters and running statistics are
      identical, but during warm-up RepBN's parameters receive zero gradients instead of
      ``None`` (weight decay then still applies to them during warm-up).
    * ``total_step=0`` switches from LN to RepBN right after warm-up (λ = 0; official: 0/0).
    """

    def __init__(
        self,
        num_features: int,
        warm: int = 0,
        total_step: int = 300000,
        r0: float = 1.0,
        ln_eps: float = 1e-6,
        bn_eps: float = 1e-5,
        momentum: float = 0.1,
        alpha_init: float = 1.0,
        *,
        accumulation_steps: int = 1,
        eval_mix: bool = False,
        reducer: Reducer | None = None,
        stats_dtype: torch.dtype | None = None,
        backend: str | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("warm", warm), ("total_step", total_step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"PRepBN: {name} must be a non-negative int (training forward calls), got {v!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"PRepBN: accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if not isinstance(r0, (int, float)) or not math.isfinite(r0) or r0 < 0:
            raise ValueError(f"PRepBN: r0 (initial LN weight λ) must be a finite number >= 0, got {r0!r}")
        self.num_features = int(num_features)
        self.r0 = float(r0)
        self.accumulation_steps = accumulation_steps
        self.eval_mix = bool(eval_mix)
        self.register_buffer("warm", torch.tensor(warm, device=device))
        self.register_buffer("iter", torch.tensor(total_step, device=device))
        self.register_buffer("total_step", torch.tensor(total_step, device=device))
        if accumulation_steps > 1:
            self.register_buffer("num_step", torch.tensor(0, device=device))
        else:
            self.num_step = None
        self.norm1 = LayerNorm(num_features, ln_eps, stats_dtype=stats_dtype, backend=backend, device=device, dtype=dtype)
        self.norm2 = RepBN(
            num_features,
            bn_eps,
            momentum,
            alpha_init,
            reducer=reducer,
            stats_dtype=stats_dtype,
            backend=backend,
            process_group=process_group,
            device=device,
            dtype=dtype,
        )

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()

    def reset_schedule(self, warm: int | None = None, total_step: int | None = None) -> None:
        """Restart the decay: ``iter ← total_step`` (optionally set new ``warm``/``total_step`` first)."""
        with torch.no_grad():
            if warm is not None:
                self.warm.fill_(warm)
            if total_step is not None:
                self.total_step.fill_(total_step)
            self.iter.copy_(self.total_step)
            if self.num_step is not None:
                self.num_step.zero_()

    def current_lambda(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """λ (LN weight) the next training forward uses: 1 during warm-up, then ``r0·iter/total_step``."""
        return prepbn_lambda(self.warm, self.iter, self.total_step, self.r0, dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_tokens(x, self.num_features, type(self).__name__)
        acc = accumulation_dtype(x.dtype)
        if not self.training:
            if not self.eval_mix:
                return self.norm2(x, mask)
            lam = self.current_lambda(acc)
            if torch.compiler.is_compiling():
                return prepbn_mix(self.norm1(x), self.norm2(x, mask), lam)
            return self._mix(x, mask, lam)
        if torch.compiler.is_compiling():
            # branch-free: both norms run; RepBN commits its running statistics only after warm-up.
            # λ is read from a snapshot of the counters: see snapshot (torch.compile recompute bug)
            warm, it = snapshot(self.warm, self.iter)
            lam = prepbn_lambda(warm, it, self.total_step, self.r0, acc)
            in_warm = warm > 0
            ln, rep = self.norm1(x), self.norm2._forward(x, mask, commit=~in_warm)
            prepbn_advance_(self.warm, self.iter, self.num_step, self.accumulation_steps)
            return prepbn_mix(ln, rep, lam)
        if bool(self.warm > 0):  # official control flow: warm-up is LN alone
            prepbn_advance_(self.warm, self.iter, self.num_step, self.accumulation_steps)
            return self._layer_norm(x, self.norm1.weight, self.norm1.bias)[0]
        lam = self.current_lambda(acc)
        prepbn_advance_(self.warm, self.iter, self.num_step, self.accumulation_steps)
        return self._mix(x, mask, lam)

    def _mix(self, x: Tensor, mask: Tensor | None, lam: Tensor) -> Tensor:
        """``λ·LN(x) + (1 − λ)·RepBN(x)`` in eager code with each weight folded into its branch's affine.

        ``λ·LN(x)`` is LayerNorm with γ, β scaled by λ and ``(1 − λ)·RepBN(x)`` RepBN with γ, β, α
        scaled by 1 − λ (C-sized products: same values and gradients as the mix, one add instead of
        four input-sized products and two selections). At λ = 0 the LN branch is exactly 0 except in
        a NaN/inf token, which RepBN's batch statistics make NaN everywhere anyway. At λ = 1 (one
        call, right after warm-up with ``r0 = 1``) RepBN with γ = 0 would still spread one NaN token's
        batch statistics to every token, so that call keeps :func:`prepbn_mix` (LN alone).
        """
        ln = self.norm1
        if float(lam) == 1.0:  # one host read per call (the eager schedule reads warm already)
            return prepbn_mix(self._layer_norm(x, ln.weight, ln.bias)[0], self.norm2(x, mask), lam)
        rep_bn = self.norm2.bn
        if self.training and self._fusable(x, mask):
            y = prepbn_mix_fused(
                x, ln.weight, ln.bias, rep_bn.weight, rep_bn.bias, self.norm2.alpha, lam,
                rep_bn.running_mean, rep_bn.running_var, rep_bn.momentum, ln.eps, rep_bn.eps, backend=rep_bn.backend,
            )
            if y is not None:
                with torch.no_grad():
                    rep_bn.num_batches_tracked.add_(1)
                return y
        ln_out, fresh = self._layer_norm(
            x, scale_param(ln.weight, lam, self.num_features, x), scale_param(ln.bias, lam, None, x), float(lam)
        )
        rep = self.norm2._forward(x, mask, scale=1 - lam)
        # ATen's LayerNorm output is a fresh tensor its backward does not read: sum into it in place
        return ln_out.add_(rep) if fresh and rep.dtype == ln_out.dtype else ln_out + rep

    def _fusable(self, x: Tensor, mask: Tensor | None) -> bool:
        """Whether :func:`prepbn_mix_fused` computes this training call exactly: ATen's LayerNorm and
        BatchNorm configurations (no mask, no sync, no dtype override or weight offset, affine
        parameters, untracked buffers), float32/float64 throughout, eager code, > 1 token."""
        ln, bn = self.norm1, self.norm2.bn
        params = (ln.weight, ln.bias, bn.weight, bn.bias, self.norm2.alpha)
        return (
            mask is None and sync_reducer(bn) is None and ln.stats_dtype is None and bn.stats_dtype is None
            and not ln.weight_offset and not torch.compiler.is_compiling()
            and x.dtype in (torch.float32, torch.float64) and x.numel() > x.shape[-1]
            and all(p is not None and p.dtype == x.dtype for p in params)
            and bn.running_mean.dtype == x.dtype and bn.running_var.dtype == x.dtype
            and not (bn.running_mean.requires_grad or bn.running_var.requires_grad)
            and resolve(ln.backend, x, "layer_norm", True) == "native"
            and resolve(bn.backend, x, "batch_norm", True) == "native"
        )

    def _layer_norm(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: float = 1.0
    ) -> tuple[Tensor, bool]:
        """``norm1``'s LayerNorm with these affine parameters (``scale`` multiplies its weight offset),
        and whether the output is ATen's own fresh tensor.

        ATen's op with its per-token statistics checked at every input size on CPU (normkit's
        LayerNorm checks from 2^18 elements up): an overflowed token (|x| past ~1e19 in float32)
        goes to normkit's overflow-safe path instead of coming out NaN.
        """
        ln = self.norm1
        backend = ln.backend
        if (ln.stats_dtype is None and not ln.weight_offset and x.is_cpu
                and resolve(backend, x, "layer_norm", True) == "native"):
            y, _, rstd = torch.native_layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)
            if aten_finite(rstd):
                return y, True
            backend = "eager"
        y = layer_norm(
            x, ln.normalized_shape, weight, bias, ln.eps, weight_offset=scale * ln.weight_offset,
            stats_dtype=ln.stats_dtype, backend=backend,
        )
        return y, False

    def extra_repr(self) -> str:
        s = f"{self.num_features}, warm={int(self.warm)}, iter={int(self.iter)}, total_step={int(self.total_step)}, r0={self.r0}"
        if self.accumulation_steps > 1:
            s += f", accumulation_steps={self.accumulation_steps}"
        return s + (", eval_mix=True" if self.eval_mix else "")
