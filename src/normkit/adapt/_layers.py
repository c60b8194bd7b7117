"""Test-time BatchNorm replacements: one module per statistics rule of :class:`~normkit.adapt.TestTimeAdapter`.

Each class is built from a trained ``_BatchNorm`` (torch's or normkit's, any rank, normkit's
``channels_last=True`` included) and keeps its ``weight``/``bias`` parameters and ``eps``. The
layers adapt on every call regardless of ``.training``: the adapter decides when they run.
All statistics are per channel over the batch and every position (``(N, *)`` of an
``(N, C, *)`` input) unless stated otherwise; half inputs accumulate in float32
(:func:`normkit.stats.moments`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import functional as F
from normkit.functional._core import check_channels_first, check_momentum
from normkit.stats import Reducer, moments


def values_per_channel(x: Tensor) -> int:
    """Number of values each channel of an ``(N, C, *)`` tensor has in the batch (N · positions)."""
    return x.numel() // max(x.shape[1], 1)


def batch_moments(x: Tensor, correction: int, reducer: Reducer | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance of an ``(N, C, *)`` tensor over N and all positions, shaped (C,);
    over every process's test batch with a ``reducer`` (:mod:`normkit.sync`)."""
    dims = (0, *range(2, x.dim()))
    m = moments(x, dims, correction=correction, reducer=reducer)
    return m.mean.reshape(-1), m.var.reshape(-1)


class TTABatchNorm(nn.Module, ABC):
    """Base of the test-time layers: copies the source BN's affine, eps and (optionally) statistics."""

    #: name of the :class:`TestTimeAdapter` method, for messages
    method = ""
    #: whether the rule needs the source running statistics
    needs_source = True
    #: whether the rule estimates a variance from the current batch (fails with 1 value per channel)
    needs_batch_variance = False
    #: cross-process sum for the test-batch statistics (``TestTimeAdapter(process_group=...)``); None = local
    reducer: Reducer | None = None

    def __init__(self, bn: _BatchNorm, name: str = "") -> None:
        super().__init__()
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.channels_last = bool(getattr(bn, "channels_last", False))
        self.layer_name = name or type(bn).__name__
        self.source_momentum = 0.1 if bn.momentum is None else float(bn.momentum)
        # The adapter works on a deep copy, so the copied BN's parameters are reused as they are.
        self.weight = bn.weight
        self.bias = bn.bias
        if self.needs_source:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(
                    f"{self.method} mixes test statistics with the source running statistics, but layer "
                    f"'{self.layer_name}' ({type(bn).__name__}) has none (track_running_stats=False); "
                    "use method='tbn' or 'tent' for it"
                )
            self.register_buffer("source_mean", bn.running_mean.detach().clone().float())
            self.register_buffer("source_var", bn.running_var.detach().clone().float())

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise ValueError(f"{type(self).__name__} (test-time {self.method}) does not support a mask")
        if self.channels_last:
            if x.dim() < 2 or x.shape[-1] != self.num_features:
                raise ValueError(
                    f"{type(self).__name__} ('{self.layer_name}', channels_last) expects input (N, *, {self.num_features}), "
                    f"got {tuple(x.shape)}"
                )
            return self.adapt(x.movedim(-1, 1)).movedim(1, -1)
        check_channels_first(x, self.num_features, f"{type(self).__name__} ('{self.layer_name}')")
        return self.adapt(x)

    def check_batch_variance(self, x: Tensor) -> None:
        if self.needs_batch_variance and values_per_channel(x) <= 1:
            raise ValueError(
                f"{self.method} estimates a variance from the test batch, but layer '{self.layer_name}' got one value "
                f"per channel (input {tuple(x.shape)}): use a batch of at least 2, or a method that works at batch "
                "size 1 on such features (source, alpha_bn, unmix_tns)"
            )

    @abstractmethod
    def adapt(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (channels first) with this method's statistics, updating its state."""

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``(x − mean)/sqrt(var + eps)·w + b`` with per-channel (C,) statistics (differentiable in them)."""
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, layer='{self.layer_name}'" + (
            ", channels_last=True" if self.channels_last else ""
        )


class TestBatchNorm(TTABatchNorm):
    """Test-batch statistics ("TBN", "BN adapt", AdaBN applied online): BN in training mode without updates.

    ``y = (x − μ_B)/sqrt(σ²_B + eps)·w + b`` with the batch mean and *biased* variance; the source
    statistics are ignored. Gradients flow through μ_B, σ²_B as in a training-mode BN (TENT uses this).
    Needs more than one value per channel (batch 1 works on conv features with H·W > 1).
    """

    __test__ = False  # not a pytest class
    method = "tbn"
    needs_source = False
    needs_batch_variance = True

    def adapt(self, x: Tensor) -> Tensor:
        self.check_batch_variance(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps, reducer=self.reducer)


class AlphaBatchNorm(TTABatchNorm):
    """α-BN: ``μ = α·μ_test + (1 − α)·μ_source``, ``σ² = α·σ²_test + (1 − α)·σ²_source``.

    You, Li, Zhao 2021, "Test-time Batch Statistics Calibration for Covariate Shift", arXiv:2110.04065.
    Follows ``AlphaBatchNorm`` of mariodoebler/test-time-adaptation (from bethgelab/robusta; no official
    code exists): σ²_test is the *unbiased* batch variance (torch's ``running_var`` of a momentum-1 BN),
    the statistics carry no gradient, and nothing is stored between calls. ``alpha = 0.1`` (10 % test
    statistics) is the default there and the paper's recommendation.

    Divergence: with one value per channel (batch 1 on ``(1, C)`` features) the reference raises
    (torch's "more than 1 value per channel"); here the unbiased variance is undefined and the biased
    one (0) is used, so ``σ² = (1 − α)·σ²_source`` and batch size 1 works everywhere.
    """

    method = "alpha_bn"

    def __init__(self, bn: _BatchNorm, name: str = "", alpha: float = 0.1) -> None:
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha_bn: alpha must be in [0, 1] (weight of the test-batch statistics), got {alpha!r}")
        super().__init__(bn, name)
        self.alpha = float(alpha)

    def adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            mean_b, var_b = batch_moments(x, correction=1 if values_per_channel(x) > 1 else 0, reducer=self.reducer)
            mean = (1 - self.alpha) * self.source_mean + self.alpha * mean_b.to(self.source_mean.dtype)
            var = (1 - self.alpha) * self.source_var + self.alpha * var_b.to(self.source_var.dtype)
        return self.normalize(x, mean, var)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}"


class _RunningBatchNorm(TTABatchNorm):
    """Base of the rules with running statistics moved towards every test batch's by ``momentum``.

    Buffers ``running_mean``/``running_var`` start at the source statistics.
    """

    needs_batch_variance = True

    def __init__(self, bn: _BatchNorm, name: str = "", momentum: float = 0.1) -> None:
        momentum = check_momentum(momentum, self.method)
        super().__init__(bn, name)
        self.momentum = momentum
        self.register_buffer("running_mean", self.source_mean.clone())
        self.register_buffer("running_var", self.source_var.clone())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}"


class EMABatchNorm(_RunningBatchNorm):
    """Running statistics updated with every test batch, then used to normalize it.

    ``r ← (1 − m)·r + m·batch`` (torch's convention, unbiased batch variance), starting from the source
    statistics; the output uses the *updated* ``r`` (as ``EMABatchNorm`` / "BN-EMA" in
    mariodoebler/test-time-adaptation: a train-mode forward to update, an eval-mode forward to predict).
    ``momentum`` defaults to 0.1 (the reference uses each BN's own momentum, 0.1 by default).
    Needs more than one value per channel.
    """

    method = "ema_bn"

    def adapt(self, x: Tensor) -> Tensor:
        self.check_batch_variance(x)
        with torch.no_grad():
            mean_b, var_b = batch_moments(x, correction=1, reducer=self.reducer)
            self.running_mean.lerp_(mean_b.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var_b.to(self.running_var.dtype), self.momentum)
        return self.normalize(x, self.running_mean, self.running_var)


class RobustBatchNorm(_RunningBatchNorm):
    """RoTTA's robust BN: ``μ ← (1 − m)·μ + m·μ_B``, ``σ² ← (1 − m)·σ² + m·σ²_B``, normalize with the new μ, σ².

    Yuan, Xie, Li 2023, "Robust Test-Time Adaptation in Dynamic Scenarios", arXiv:2303.13899
    (``RobustBN1d/2d`` in the RoTTA code, as vendored in devavratTomar/unmixtns). σ²_B is the *biased*
    batch variance, ``momentum`` (RoTTA's ``ALPHA``) defaults to 0.05, the statistics start at the source
    ones, and gradients flow through μ_B, σ²_B into the output (the stored statistics are detached).
    Only the layer: RoTTA's memory bank, teacher model and re-weighting are not part of this method.

    Divergence: with one value per channel the reference takes σ²_B = 0 and the variance decays towards 0
    over a stream; here that raises (use ``alpha_bn``/``unmix_tns`` at batch 1 on ``(1, C)`` features).
    """

    method = "robust_bn"

    def __init__(self, bn: _BatchNorm, name: str = "", momentum: float = 0.05) -> None:
        super().__init__(bn, name, momentum)

    def adapt(self, x: Tensor) -> Tensor:
        self.check_batch_variance(x)
        mean_b, var_b = batch_moments(x, correction=0, reducer=self.reducer)
        m = self.momentum
        mean = (1 - m) * self.running_mean + m * mean_b.to(self.running_mean.dtype)
        var = (1 - m) * self.running_var + m * var_b.to(self.running_var.dtype)
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        return self.normalize(x, mean, var)


class UnMixTNSBatchNorm(TTABatchNorm):
    """UnMix-TNS: per-sample statistics mixed with K online statistics components.

    Tomar, Vray, Thiran, Bozorgtabar 2024, "Un-Mixing Test-Time Normalization Statistics: Combatting
    Label Temporal Correlation", arXiv:2401.08328; as ``UnMixTNS2d`` in devavratTomar/unmixtns
    (``tta_experiments/unmixtns.py``, commit 8e12b9f).

    Components (buffers ``components_mean``/``components_var``, shape (K, C)), initialised from the
    source statistics μ_s, σ²_s with ``init_coeff`` a = 0.5::

        μ_k = μ_s + sqrt(a·K/(K − 1))·σ_s·ε_k,  ε_k ~ N(0, 1)       σ²_k = (1 − a)·σ²_s     (K = 1: μ_k = μ_s, σ²_k = σ²_s)

    Every call, with instance statistics μ̃_b, σ̃²_b (mean and biased variance over the positions of
    sample b; gradients flow through them)::

        p_bk   = softmax_k( cos(μ̃_b, μ_k) / τ )                            (no gradient, τ = 0.07)
        m_bk   = (1 − p_bk)·μ_k + p_bk·μ̃_b          v_bk = (1 − p_bk)·σ²_k + p_bk·σ̃²_b
        μ_b    = mean_k m_bk                         σ²_b = mean_k v_bk + mean_k m_bk² − μ_b²
        μ_k   += M · mean_b p_bk·(μ̃_b − μ_k)        σ²_k += M · mean_b p_bk·(σ̃²_b − σ²_k)     (no gradient)
        y      = (x − μ_b)/sqrt(σ²_b + eps)·w + b

    using the *pre-update* components for μ_b, σ²_b (the code's order: statistics, update, output), with
    ``M = 1 − (1 − bn.momentum)^(B/B_max)`` (0.1 at B = B_max = 64). ``(N, C)`` inputs without positions
    use the source statistics (the code's ``UnMixTNS1d``).

    B in M is fixed, as in the code (its configured batch size): ``batch_size=B`` sets it, and
    ``batch_size=None`` (default) takes the size of the first batch the layer sees (the stream's batch
    size; a shorter last batch then keeps the same M, as in the code). It is stored in the buffer
    ``fixed_batch_size`` (0 = not yet seen), so ``reset()`` and checkpoints carry it.

    Divergences: the noise is drawn from a seeded generator (``seed``),
    not the global RNG, so adapters are reproducible; every ``_BatchNorm`` rank is handled (the code:
    BatchNorm1d/2d only).
    """

    method = "unmix_tns"

    def __init__(
        self,
        bn: _BatchNorm,
        name: str = "",
        num_components: int = 16,
        *,
        batch_size: int | None = None,
        batch_size_max: int = 64,
        temperature: float = 0.07,
        init_coeff: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"unmix_tns: num_components must be a positive int, got {num_components!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"unmix_tns: batch_size must be a positive int or None, got {batch_size!r}")
        if not isinstance(batch_size_max, (int, float)) or not batch_size_max > 0:
            raise ValueError(f"unmix_tns: batch_size_max must be > 0, got {batch_size_max!r}")
        if not temperature > 0:
            raise ValueError(f"unmix_tns: temperature must be > 0, got {temperature!r}")
        if not 0.0 <= init_coeff < 1.0:
            raise ValueError(f"unmix_tns: init_coeff must be in [0, 1), got {init_coeff!r}")
        super().__init__(bn, name)
        self.num_components = num_components
        self.register_buffer("fixed_batch_size", torch.tensor(batch_size or 0, dtype=torch.long))
        self.batch_size_max = batch_size_max
        self.temperature = float(temperature)
        self.init_coeff = float(init_coeff)
        k = num_components
        mean = self.source_mean.repeat(k, 1)
        var = self.source_var.repeat(k, 1)
        coeff = 0.0 if k == 1 else self.init_coeff
        if k > 1:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            mean = mean + math.sqrt(coeff * k / (k - 1)) * var.sqrt() * noise
        self.register_buffer("components_mean", mean)
        self.register_buffer("components_var", (1 - coeff) * var)

    def update_momentum(self, batch: int) -> float:
        """``M = 1 − (1 − bn.momentum)^(B / B_max)`` with B fixed at the first batch's size (or ``batch_size``)."""
        if int(self.fixed_batch_size) == 0:
            self.fixed_batch_size.fill_(batch)
        return 1.0 - (1.0 - self.source_momentum) ** (int(self.fixed_batch_size) / self.batch_size_max)

    def adapt(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self.normalize(x, self.source_mean, self.source_var)
        n, c = x.shape[:2]
        inst = moments(x.reshape(n, c, -1), 2, correction=0)
        inst_mean, inst_var = inst.mean.squeeze(-1), inst.var.squeeze(-1)  # (B, C)
        sd = torch.promote_types(inst_mean.dtype, self.components_mean.dtype)
        inst_mean, inst_var = inst_mean.to(sd), inst_var.to(sd)
        comp_mean, comp_var = self.components_mean.to(sd), self.components_var.to(sd)  # (K, C)
        with torch.no_grad():
            sim = TF.normalize(inst_mean, dim=1) @ TF.normalize(comp_mean, dim=1).T  # (B, K)
            p = torch.softmax(sim / self.temperature, dim=1).unsqueeze(-1)  # (B, K, 1)
        mean_mat = (1 - p) * comp_mean.unsqueeze(0) + p * inst_mean.unsqueeze(1)  # (B, K, C)
        var_mat = (1 - p) * comp_var.unsqueeze(0) + p * inst_var.unsqueeze(1)
        mean = mean_mat.mean(1)
        var = var_mat.mean(1) + mean_mat.square().mean(1) - mean.square()
        with torch.no_grad():
            m = self.update_momentum(n)
            new_mean = comp_mean + m * (p * (inst_mean.unsqueeze(1) - comp_mean.unsqueeze(0))).mean(0)
            new_var = comp_var + m * (p * (inst_var.unsqueeze(1) - comp_var.unsqueeze(0))).mean(0)
            self.components_mean.copy_(new_mean)
            self.components_var.copy_(new_var)
        shape = (n, c) + (1,) * (x.dim() - 2)
        y = (x.to(mean.dtype) - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        aff = (1, c) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(aff).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.reshape(aff).to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", num_components={self.num_components}, batch_size={int(self.fixed_batch_size) or None}, "
            f"batch_size_max={self.batch_size_max}, temperature={self.temperature}"
        )
