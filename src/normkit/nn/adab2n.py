"""AdaB²N: Adaptive Balance of BatchNorm for continual learning (Lyu et al., NeurIPS 2023).

Lyu, Wang, Zhang, Sun, Su, Zhu & Jing, "Overcoming Recency Bias of Normalization Statistics in
Continual Learning: Balance and Adaptation", 2023, arXiv:2310.08855. Official code:
``lvyilin/AdaB2N`` (``models/utils/adab2n.py``, ``models/er_ace_ada.py``), commit 9aaba7e.

BatchNorm trained on a stream of tasks normalizes with statistics dominated by the current
task (recency bias). AdaB²N (i) balances the *training* statistics across the tasks present in
the batch with learnable, Dirichlet-posterior task weights and (ii) balances the *running*
(test-time) statistics with a modified momentum schedule η_t controlled by κ.

The pieces, as in the official code:

* :class:`AdaB2N` — the layer (registered as ``adab2n``).
* :func:`convert_adab2n` — replace every BatchNorm of a model (torch's and normkit's).
* :func:`set_task_labels` / :func:`set_task_ids` — the per-step task counts: before each
  training forward the training loop tells every layer which task each sample of the
  (current + replay) batch belongs to, ``task = label // classes_per_task``.
* :func:`end_task` — advance the task counter of every layer after each task.
* :func:`adab2n_regularizer` — the regulariser ``Σ_layers ‖μ − μ_run‖² + ‖σ² − σ²_run‖²``
  (means over channels) that the training loop adds with weight λ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import functional as NF
from normkit.functional._core import check_channels_first, check_eps, check_momentum, snapshot
from normkit.functional.batch_variants import (
    bn_coefficients,
    moments_fast_path,
    pooled_moments,
    sample_affine,
    sample_moments,
)
from normkit.nn._base import sync_reducer
from normkit.nn.replace import replace_modules
from normkit.registry import Paper, register_norm
from normkit.stats import Reducer, SumSpec, accumulation_dtype, global_means, moments
from normkit.sync import ProcessGroupLike, check_process_group, reduce_packed

ADAB2N = Paper(
    "Overcoming Recency Bias of Normalization Statistics in Continual Learning: Balance and Adaptation",
    2023,
    "2310.08855",
    "Lyu, Wang, Zhang, Sun, Su, Zhu, Jing",
)

__all__ = [
    "ADAB2N",
    "AdaB2N",
    "adab2n_eta",
    "adab2n_layers",
    "adab2n_regularizer",
    "adab2n_sample_weights",
    "adab2n_statistics",
    "convert_adab2n",
    "end_task",
    "set_task_ids",
    "set_task_labels",
]


# --------------------------------------------------------------------------- functional


def adab2n_eta(kappa: float, momentum: float, step: Tensor, num_batches_tracked: Tensor) -> Tensor | float:
    """The modified momentum η of AdaB²N's running-statistics update (official ``get_eta``).

    * ``kappa == 0``: ``η = 1 / num_batches_tracked`` (the cumulative average);
    * ``kappa == 1``: ``η = momentum`` (BatchNorm's exponential average);
    * otherwise the recursion ``η_1 = m^κ``, ``η_t = η_{t−1} / (η_{t−1} + (1 − m)^κ)``, which
      decays from ``m^κ`` towards ``1 − (1 − m)^κ``. ``step`` is t (1 for the first update
      after construction/conversion). It is evaluated in closed form,
      ``1/η_t = a^{t−1}·m^{−κ} + (1 − a^{t−1}) / (1 − a)`` with ``a = (1 − m)^κ``, in float64
      (float32 on MPS), so a resumed run continues the schedule exactly.

    The two end cases agree with the recursion's limits (κ→0: 1/t; κ→1: m).
    Returns a Python float for κ = 1, else a 0-dim float tensor.
    """
    if kappa == 1.0:
        return float(momentum)
    dt = torch.float64 if step.device.type != "mps" else torch.float32
    if kappa == 0.0:
        return 1.0 / num_batches_tracked.to(dt)
    if momentum == 0.0:
        return torch.zeros((), dtype=dt, device=step.device)
    a = (1.0 - momentum) ** kappa
    t = step.to(dt)
    decay = torch.pow(torch.tensor(a, dtype=dt, device=step.device), t - 1.0)
    inv = decay * momentum ** (-kappa) + (1.0 - decay) / (1.0 - a)  # a < 1 since momentum > 0
    return 1.0 / inv


def adab2n_sample_weights(
    task_ids: Tensor,
    task_weight: Tensor,
    cur_tasks: Tensor,
    *,
    renormalize: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-sample weights ``w_i = π_{t(i)} / n_{t(i)}`` of AdaB²N's balanced batch statistics.

    ``n_t`` counts the samples of task t in the batch; the Dirichlet posterior over the task
    proportions of the seen tasks ``t ≤ cur_tasks`` has concentration ``exp(task_weight_t) + n_t``
    (prior ``exp(task_weight)``) and its mean ``π_t = conc_t / Σ_s conc_s`` weighs task t.

    Official behaviour (``renormalize=False``): a seen task with no sample in the batch keeps its
    π_t in the normaliser, so ``Σ_i w_i < 1`` and the statistics shrink. ``renormalize=True`` takes
    π over the tasks present in the batch only (``Σ_i w_i = 1``); not in the official code.
    """
    dt = dtype or task_weight.dtype
    onehot = _task_onehot(task_ids, task_weight.numel(), dt)  # (N, T)
    return onehot @ _task_weights(onehot.sum(0), task_weight, cur_tasks, renormalize)


def _task_onehot(task_ids: Tensor, num_tasks: int, dtype: torch.dtype) -> Tensor:
    return (task_ids.reshape(-1, 1) == torch.arange(num_tasks, device=task_ids.device)).to(dtype)


def _task_weights(counts: Tensor, task_weight: Tensor, cur_tasks: Tensor, renormalize: bool) -> Tensor:
    """Per-task weight ``π_t / n_t`` from the task counts ``n_t`` (the Dirichlet-posterior mean over seen tasks)."""
    tasks = torch.arange(counts.numel(), device=counts.device)
    keep = tasks <= cur_tasks
    if renormalize:
        keep = keep & (counts > 0)
    conc = torch.where(keep, task_weight.to(counts.dtype).exp() + counts, torch.zeros_like(counts))
    pi = conc / conc.sum()
    return pi / counts.clamp_min(1.0)


def adab2n_statistics(x: Tensor, sample_weights: Tensor, stats_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Weighted per-channel mean and (biased) variance of an ``(N, C, *)`` tensor.

    ``μ_c = Σ_i w_i · mean_pos(x_ic)`` and ``σ²_c = Σ_i w_i · mean_pos((x_ic − μ_c)²)``
    (official ``input.mean([2, 3]).t().matmul(sample_weights)``). Returns shapes ``(C,)`` in
    the accumulation dtype (float32 for half inputs).
    """
    n, c = x.shape[0], x.shape[1]
    xs = x.reshape(n, c, -1).to(accumulation_dtype(x.dtype, stats_dtype))
    w = sample_weights.to(xs.dtype)
    mean = w @ xs.mean(2)
    var = w @ (xs - mean.reshape(1, c, 1)).square().mean(2)
    return mean, var


# --------------------------------------------------------------------------- module


def _adab2n_sample_kwargs(channels: int) -> dict[str, int]:
    return {"num_tasks": 5, "classes_per_task": 2}


@register_norm(
    "adab2n",
    family="batch",
    paper=ADAB2N,
    layout="channels_first",
    batch_dependent=True,
    train_eval_differ=True,
    description="continual-learning BN: Dirichlet-weighted task-balanced batch statistics, modified momentum (kappa)",
    aliases=("ada_b2n",),
    sample_kwargs=_adab2n_sample_kwargs,
)
class AdaB2N(_BatchNorm):
    """AdaB²N: BatchNorm with task-balanced training statistics and a modified momentum.

    Lyu et al., "Overcoming Recency Bias of Normalization Statistics in Continual Learning:
    Balance and Adaptation", NeurIPS 2023, arXiv:2310.08855. Follows the official
    ``models/utils/adab2n.py`` (``lvyilin/AdaB2N`` @ 9aaba7e); parameter/buffer names match it
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``,
    ``task_weight``, ``cur_tasks``), so its checkpoints load.

    Training, with task ids set (:meth:`set_task_ids` / :func:`set_task_labels`, or the optional
    ``task_ids`` forward argument) and at least one finished task (``cur_tasks > 0``)::

        n_t    = #samples of task t in the batch          (t = label // classes_per_task)
        π_t    = (exp(task_weight_t) + n_t) / Σ_{s ≤ cur_tasks} (exp(task_weight_s) + n_s),  t ≤ cur_tasks
        w_i    = π_{t(i)} / n_{t(i)}
        μ_c    = Σ_i w_i · mean_pos(x_ic),   σ²_c = Σ_i w_i · mean_pos((x_ic − μ_c)²)

    otherwise ``μ, σ²`` are the plain batch mean and *biased* variance. Output
    ``y = (x − μ) / sqrt(σ² + eps) · weight + bias``. Then (no gradient)::

        running_mean ← running_mean + η (μ − running_mean)
        running_var  ← (1 − η) running_var + η σ²            (biased σ², no Bessel correction)

    with η from :func:`adab2n_eta` (κ = 0: 1/num_batches_tracked; κ = 1: momentum; else the
    recursion η_1 = m^κ, η_t = η_{t−1}/(η_{t−1} + (1 − m)^κ)), and the regulariser
    ``self.loss = mean_c (μ − running_mean)² + mean_c (σ² − running_var)²`` against the *updated*
    running statistics (gradient through μ, σ² into the input and ``task_weight``; read it with
    :meth:`regularizer` or :func:`adab2n_regularizer`). Eval: plain BN with the running statistics.

    ``task_weight`` (num_tasks,) is a learnable parameter (init ``init_weight`` = 0): create the
    optimizer *after* building/converting. ``cur_tasks`` counts finished tasks (:meth:`end_task`).

    **Speed** (``"auto"``): one pass for the per-sample moments ``(m_i, v_i)`` over the positions, the plain
    and task-weighted statistics pooled from them exactly (``μ = Σ w_i m_i``, ``σ² = Σ w_i (v_i + (m_i − μ)²)``,
    the official formula regrouped), one output pass; backward saves only the input. ``backend="eager"``
    (global) runs the official formula as written.

    **Distributed**: ``process_group`` (a ``ProcessGroup`` or ``"world"``) gives training the statistics of
    the whole distributed batch — task counts, Dirichlet weights and moments exactly as one process on the
    concatenated batch — from ONE packed ``all_reduce`` per call of per-task sums about the running mean
    (:meth:`_synced_statistics`); gradients flow through it. Eval never communicates.

    Defaults: ``kappa=1.0``, ``init_weight=0.0``, ``momentum=0.1``, ``eps=1e-5``. The official grid
    is κ ∈ {0.1, 0.4, 0.7, 1.0}, λ ∈ {0.01, 0.1, 1, 10} (regulariser weight, used by the loop).

    The equations above are the official code's (which produced the paper's numbers); they were
    not re-derived from the paper's text. Divergences from the official code:

    * η's state is the buffer ``eta_steps`` (updates since construction/conversion; the official
      keeps a Python ``last_eta`` that is *not* saved, so η restarts at m^κ after a reload). Ours is in
      the state dict, so a resumed run continues exactly; loading an official checkpoint (no
      ``eta_steps``) sets it to 0, i.e. the official reload behaviour. η is evaluated in closed form
      (float64) rather than by the float recursion: equal up to rounding (~1e-15 relative).
    * Any ``(N, C, *)`` input (the official layer is ``BatchNorm2d`` only); ``channels_last=True``
      takes ``(N, *, C)``.
    * ``renormalize=True`` (default False = official) renormalizes π over the tasks present in the
      batch, so a seen task absent from the batch does not shrink the statistics.
    * Task ids are validated (eager mode): an id ``> cur_tasks`` or ``>= num_tasks`` raises
      (the official code fails with an index error or, for slices, silently ignores it).
    * The regulariser is computed against a copy of the updated running statistics, so a second
      forward before ``backward`` does not invalidate the graph.
    * ``momentum=None`` and ``track_running_stats=False`` are rejected (asserted in the official code;
      use ``kappa=0`` for the cumulative average).
    """

    def __init__(
        self,
        num_features: int,
        num_tasks: int = 1,
        classes_per_task: int = 1,
        *,
        kappa: float = 1.0,
        init_weight: float = 0.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        renormalize: bool = False,
        channels_last: bool = False,
        stats_dtype: torch.dtype | None = None,
        process_group: ProcessGroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_eps(eps)
        group = check_process_group(process_group)
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"AdaB2N: num_tasks must be a positive int, got {num_tasks!r}")
        if not isinstance(classes_per_task, int) or classes_per_task < 1:
            raise ValueError(f"AdaB2N: classes_per_task must be a positive int, got {classes_per_task!r}")
        if not isinstance(kappa, (int, float)) or not 0.0 <= kappa <= 1.0:
            raise ValueError(f"AdaB2N: kappa must be in [0, 1], got {kappa!r}")
        check_momentum(momentum, "AdaB2N", hint=" (use kappa=0 for a cumulative average)")
        if not isinstance(init_weight, (int, float)) or not math.isfinite(init_weight):
            raise ValueError(f"AdaB2N: init_weight must be a finite number, got {init_weight!r}")
        super().__init__(num_features, eps, float(momentum), affine, True, device=device, dtype=dtype)
        self.num_tasks = num_tasks
        self.classes_per_task = classes_per_task
        self.kappa = float(kappa)
        self.init_weight = float(init_weight)
        self.renormalize = bool(renormalize)
        self.channels_last = bool(channels_last)
        self.stats_dtype = stats_dtype
        self.process_group = group
        factory = {"device": device, "dtype": dtype}
        self.task_weight = nn.Parameter(torch.full((num_tasks,), self.init_weight, **factory))
        self.register_buffer("cur_tasks", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("eta_steps", torch.tensor(0, dtype=torch.long, device=device))
        self.task_ids: Tensor | None = None
        self.loss: Tensor | None = None

    def __getstate__(self) -> dict:
        # ``loss`` is a non-leaf tensor of the latest training forward (part of that step's graph):
        # copy.deepcopy / pickle would fail on it, so a copy starts without one (regularizer() needs a new forward)
        state = dict(super().__getstate__())
        state["loss"] = None
        return state

    # ------------------------------------------------------------------ continual-learning API

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "task_weight"):
            with torch.no_grad():
                self.task_weight.fill_(self.init_weight)
            self.cur_tasks.zero_()
            self.eta_steps.zero_()

    def set_task_ids(self, task_ids: Tensor | None) -> None:
        """Task id of each sample of the next training batch(es) (``None`` clears; official ``set_counts``)."""
        self.task_ids = None if task_ids is None else self._check_task_ids(task_ids, None)

    def set_task_labels(self, labels: Tensor) -> None:
        """``set_task_ids(labels // classes_per_task)`` (the official ``set_counts`` from class labels)."""
        _check_labels(labels)
        self.set_task_ids(torch.div(labels, self.classes_per_task, rounding_mode="floor"))

    def end_task(self) -> None:
        """Mark the current task finished (``cur_tasks += 1``); call after each task, as the official loop."""
        with torch.no_grad():
            self.cur_tasks.add_(1)

    def regularizer(self) -> Tensor:
        """The regulariser of the latest training forward (``self.loss``); call it after that forward."""
        if self.loss is None:
            raise RuntimeError("AdaB2N.regularizer(): no training forward has run yet")
        return self.loss

    # ------------------------------------------------------------------ forward

    def _check_input_dim(self, x: Tensor) -> None:
        check_channels_first(x, self.num_features, "AdaB2N")

    def _check_task_ids(self, task_ids: Tensor, batch: int | None) -> Tensor:
        if not isinstance(task_ids, Tensor):
            raise TypeError(f"AdaB2N: task_ids must be a tensor of task indices, got {type(task_ids).__name__}")
        if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
            raise TypeError(f"AdaB2N: task_ids must be an integer tensor, got dtype {task_ids.dtype}")
        if task_ids.dim() != 1 or (batch is not None and task_ids.numel() != batch):
            want = "(N,)" if batch is None else f"({batch},)"
            raise ValueError(f"AdaB2N: task_ids must have shape {want} (one task index per sample), got {tuple(task_ids.shape)}")
        if not torch.compiler.is_compiling() and task_ids.numel():
            lo, hi = int(task_ids.min()), int(task_ids.max())
            limit = min(int(self.cur_tasks), self.num_tasks - 1)
            if lo < 0 or hi > limit:
                raise ValueError(
                    f"AdaB2N: task ids must be in [0, {limit}] (num_tasks={self.num_tasks}, finished tasks cur_tasks="
                    f"{int(self.cur_tasks)}; call end_task() after each task), got ids in [{lo}, {hi}]"
                )
        return task_ids

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """Normalize ``x`` ``(N, C, *)``; ``task_ids`` (N,) overrides the ids set with :meth:`set_task_ids`."""
        if self.channels_last:
            if x.dim() < 2 or x.shape[-1] != self.num_features:
                raise ValueError(f"AdaB2N(channels_last=True) expects input (N, *, {self.num_features}), got {tuple(x.shape)}")
            return self._forward(x.movedim(-1, 1), task_ids).movedim(1, -1)
        return self._forward(x, task_ids)

    def _forward(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return NF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if x.numel() // x.shape[1] <= 1 and sync_reducer(self) is None:  # (synced: the global batch counts)
            raise ValueError(f"AdaB2N: expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        ids = self.task_ids if task_ids is None else task_ids
        if ids is not None:
            ids = self._check_task_ids(ids, x.shape[0])
        return self._train_forward(x, ids)

    def _train_forward(self, x: Tensor, ids: Tensor | None) -> Tensor:
        c = x.shape[1]
        reducer = sync_reducer(self)
        if reducer is not None or moments_fast_path(None):
            # per-sample moments (one pass), the batch statistics from them, one output pass; only x saved
            sm, sv = sample_moments(x, self.stats_dtype)
            if reducer is not None:
                mean, var = self._synced_statistics(sm, sv, ids, reducer)
            else:
                mean, var = pooled_moments(sm, sv)
                if ids is not None:
                    w = adab2n_sample_weights(
                        ids, self.task_weight, self.cur_tasks, renormalize=self.renormalize, dtype=sm.dtype
                    )
                    w_mean, w_var = pooled_moments(sm, sv, w)
                    balanced = self.cur_tasks > 0
                    mean, var = torch.where(balanced, w_mean, mean), torch.where(balanced, w_var, var)
            scale, shift = bn_coefficients(mean, var, self.weight, self.bias, self.eps)
            y = sample_affine(x, scale.reshape(1, c), shift.reshape(1, c), moments_of=sm)
            mean, var = mean.to(accumulation_dtype(x.dtype, self.stats_dtype)), var.to(mean.dtype)
        else:  # backend "eager": the official formula as written (the reference)
            dims = (0, *range(2, x.dim()))
            plain = moments(x, dims, stats_dtype=self.stats_dtype)
            mean, var = plain.mean.reshape(c), plain.var.reshape(c)
            if ids is not None:
                w = adab2n_sample_weights(ids, self.task_weight, self.cur_tasks, renormalize=self.renormalize, dtype=mean.dtype)
                w_mean, w_var = adab2n_statistics(x, w, self.stats_dtype)
                balanced = self.cur_tasks > 0
                mean = torch.where(balanced, w_mean, mean)
                var = torch.where(balanced, w_var, var)
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = (x.to(mean.dtype) - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
            if self.weight is not None:
                y = y * self.weight.reshape(shape).to(y.dtype) + self.bias.reshape(shape).to(y.dtype)

        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.eta_steps.add_(1)
        eta = adab2n_eta(self.kappa, self.momentum, self.eta_steps, self.num_batches_tracked)
        if isinstance(eta, Tensor):
            eta = eta.to(self.running_mean.dtype)
        # Running update with the detached statistics; the regulariser compares against these updated
        # values as constants (official: MSE against the freshly updated buffers).
        new_mean = self.running_mean + eta * (mean.detach().to(self.running_mean.dtype) - self.running_mean)
        new_var = (1 - eta) * self.running_var + eta * var.detach().to(self.running_var.dtype)
        with torch.no_grad():
            self.running_mean.copy_(new_mean)
            self.running_var.copy_(new_var)
        # snapshot: torch <= 2.13's partitioner could otherwise recompute these in the backward from the
        # running buffers *after* their in-place update (a wrong regulariser gradient, pytorch PR #197039).
        rm, rv = snapshot(new_mean.to(mean.dtype), new_var.to(var.dtype)).split(c)
        self.loss = (mean - rm).square().mean() + (var - rv).square().mean()
        return y.to(x.dtype)

    def _synced_statistics(self, sm: Tensor, sv: Tensor, ids: Tensor | None, reducer: Reducer) -> tuple[Tensor, Tensor]:
        """The global batch's plain and task-balanced statistics from ONE packed all_reduce.

        Each process sums, per task t, ``n_t``, ``S1_t = Σ_{i∈t} (m_i − K)`` and ``S2_t = Σ_{i∈t} (v_i + (m_i − K)²)``
        over its samples' per-sample moments ``(m_i, v_i)``, about a shift ``K`` equal on every process: the
        previous call's synced mean (the reducer's ``ShiftMemory``; a first call computes the exact global
        mean first, one extra collective), or the running mean for a reducer without memory. After the sum,
        with per-task weights ``u_t = π_t / n_t`` from the *global* counts,
        ``W = Σ u_t n_t``, ``e = Σ u_t S1_t``::

            μ = K·W + e,     σ² = Σ u_t S2_t − 2 e (μ − K) + (μ − K)² W

        (the plain statistics: ``u_t = 1 / Σ n``). The algebra runs in float64 on (T, C) values, so the shift
        costs no digits. Exactly the single-process result on the concatenated batch, gradients included
        (the collective is differentiable).
        """
        big = torch.float64 if sm.device.type != "mps" else sm.dtype
        # K: the previous synced mean from the reducer's ShiftMemory (equal on every process; close to this
        # batch's mean, so no digits are lost to the shift), else on a first call the exact global mean from
        # one extra no-grad collective; a reducer without memory uses the running mean (equal under DDP)
        memory = getattr(reducer, "memory", None)
        slot = reducer.next_slot() if memory is not None else -1  # type: ignore[attr-defined]
        k = memory.get(slot, sm.new_empty(sm.shape[1], dtype=big)) if memory is not None else None
        if k is None and memory is not None:
            k = global_means([SumSpec(sm.to(big), (0,))], reducer)[0].reshape(-1)
        elif k is None:
            k = snapshot(self.running_mean.detach().to(big))  # read before the in-place update (see snapshot)
        d = sm.to(big) - k
        q = sv.to(big) + d.square()
        num_tasks = self.task_weight.numel() if ids is not None else 1
        onehot = _task_onehot(ids, num_tasks, big) if ids is not None else sm.new_ones(sm.shape[0], 1, dtype=big)
        counts, s1, s2 = reduce_packed([onehot.sum(0), onehot.t() @ d, onehot.t() @ q], reducer)
        total = counts.sum()
        e_plain = s1.sum(0) / total
        mean = k + e_plain
        var = (s2.sum(0) / total - e_plain.square()).clamp_min(0)
        if ids is not None:
            u = _task_weights(counts, self.task_weight, self.cur_tasks, self.renormalize)
            w_total = (u * counts).sum()
            e = u @ s1
            w_mean = k * w_total + e
            dm = w_mean - k
            w_var = (u @ s2 - 2 * e * dm + dm.square() * w_total).clamp_min(0)
            balanced = self.cur_tasks > 0
            mean, var = torch.where(balanced, w_mean, mean), torch.where(balanced, w_var, var)
        if memory is not None:
            memory.put(slot, k + e_plain, k)  # the plain synced mean: the next call's shift
        return mean, var

    # ------------------------------------------------------------------ state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "eta_steps"
        if key not in state_dict:  # an official AdaB2N checkpoint: η restarts, as the official reload does
            state_dict[key] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", num_tasks={self.num_tasks}, classes_per_task={self.classes_per_task}, kappa={self.kappa}"
        if self.init_weight:
            s += f", init_weight={self.init_weight}"
        if self.renormalize:
            s += ", renormalize=True"
        if self.channels_last:
            s += ", channels_last=True"
        if self.stats_dtype is not None:
            s += f", stats_dtype={self.stats_dtype}"
        if self.process_group is not None:
            s += f", process_group={self.process_group!r}"
        return s


# --------------------------------------------------------------------------- model-level helpers


def _check_labels(labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
        got = type(labels).__name__ if not isinstance(labels, Tensor) else f"{labels.dtype} {tuple(labels.shape)}"
        raise TypeError(f"expected class labels as an integer tensor of shape (N,), got {got}")


def adab2n_layers(model: nn.Module) -> Iterator[AdaB2N]:
    """Every :class:`AdaB2N` layer of ``model``."""
    return (m for m in model.modules() if isinstance(m, AdaB2N))


def _layers_or_raise(model: nn.Module, what: str) -> list[AdaB2N]:
    layers = list(adab2n_layers(model))
    if not layers:
        raise ValueError(f"{what}: the model has no AdaB2N layer (convert it with convert_adab2n first)")
    return layers


def set_task_ids(model: nn.Module, task_ids: Tensor | None) -> None:
    """Set the task id of each sample of the next training batch on every AdaB2N layer (``None`` clears)."""
    for m in _layers_or_raise(model, "set_task_ids"):
        m.set_task_ids(task_ids)


def set_task_labels(model: nn.Module, labels: Tensor, classes_per_task: int | None = None) -> None:
    """The official per-step ``set_counts``: task ids ``labels // classes_per_task`` on every AdaB2N layer.

    Call it before each training forward with the labels of the whole batch the model sees
    (current + replay samples, in the order of the concatenated input). ``classes_per_task``
    defaults to each layer's own.
    """
    _check_labels(labels)
    for m in _layers_or_raise(model, "set_task_labels"):
        cpt = m.classes_per_task if classes_per_task is None else classes_per_task
        m.set_task_ids(torch.div(labels, cpt, rounding_mode="floor"))


def end_task(model: nn.Module) -> None:
    """Advance every AdaB2N layer's task counter (call after finishing each task)."""
    for m in _layers_or_raise(model, "end_task"):
        m.end_task()


def adab2n_regularizer(model: nn.Module) -> Tensor:
    """Σ over AdaB2N layers of their regulariser from the latest training forward.

    The official ER-ACE/DER++ loops add ``lambd * adab2n_regularizer(model)`` to the loss (from
    task ``ada_t0`` on). Call it after the training forward of the current step.
    """
    return torch.stack([m.regularizer() for m in _layers_or_raise(model, "adab2n_regularizer")]).sum()


def convert_adab2n(
    model: nn.Module,
    num_tasks: int,
    classes_per_task: int,
    kappa: float = 1.0,
    *,
    init_weight: float = 0.0,
    renormalize: bool = False,
) -> nn.Module:
    """Replace every BatchNorm of ``model`` (torch's ``_BatchNorm`` subclasses and normkit's
    ``BatchNorm``/``BatchNorm1d/2d/3d``) with :class:`AdaB2N`, copying ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``, ``eps``, ``momentum``, ``affine``,
    ``requires_grad`` flags, device, dtype and train/eval mode (official ``AdaB2N(target_bn, ...)``).

    Works in place and returns the model (a new module when ``model`` itself is a BatchNorm), like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Existing AdaB2N layers are kept. Build the
    optimizer afterwards: the new ``task_weight`` parameters must be in it. A synchronized BatchNorm
    (torch's ``SyncBatchNorm``, normkit's ``process_group``) gives a synchronized AdaB2N (same group).
    Raises ValueError for a BatchNorm with ``track_running_stats=False``, ``momentum=None`` or a custom
    cross-process ``reducer``.
    """
    return replace_modules(
        model,
        lambda name, m: isinstance(m, _BatchNorm) and not isinstance(m, AdaB2N),
        lambda name, m: _from_bn(m, num_tasks, classes_per_task, kappa, init_weight, renormalize),  # type: ignore[arg-type]
    ).model


def _from_bn(
    bn: _BatchNorm, num_tasks: int, classes_per_task: int, kappa: float, init_weight: float, renormalize: bool
) -> AdaB2N:
    what = f"convert_adab2n: {type(bn).__name__}({bn.num_features})"
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"{what} has track_running_stats=False; AdaB2N needs running statistics")
    if bn.momentum is None:
        raise ValueError(f"{what} has momentum=None; AdaB2N needs a momentum (kappa=0 gives the cumulative average)")
    if getattr(bn, "reducer", None) is not None:
        raise ValueError(f"{what} has a custom cross-process reducer; AdaB2N synchronizes through process_group only")
    # synchronized BatchNorm stays synchronized: torch's SyncBatchNorm (None = the world group) or normkit's process_group
    group = (bn.process_group or "world") if isinstance(bn, nn.SyncBatchNorm) else getattr(bn, "process_group", None)
    ref = bn.running_mean
    new = AdaB2N(
        bn.num_features, num_tasks, classes_per_task, kappa=kappa, init_weight=init_weight, eps=bn.eps,
        momentum=bn.momentum, affine=bn.affine, renormalize=renormalize,
        channels_last=bool(getattr(bn, "channels_last", False)), stats_dtype=getattr(bn, "stats_dtype", None),
        process_group=group, device=ref.device, dtype=ref.dtype,
    )  # fmt: skip
    missing, unexpected = new.load_state_dict(bn.state_dict(), strict=False)
    if unexpected or set(missing) - {"task_weight", "cur_tasks", "eta_steps"}:
        raise ValueError(f"{what}: unexpected state (missing {missing}, unexpected {unexpected})")
    if bn.affine:
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
    new.train(bn.training)
    return new
