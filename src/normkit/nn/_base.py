"""Small helpers shared by the module shells."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from normkit.backend import BACKENDS
from normkit.functional._core import check_eps
from normkit.stats import Reducer
from normkit.sync import GroupSum, ShiftMemory, check_process_group


def check_module_args(eps: float | None, backend: str | None) -> None:
    if eps is not None:
        check_eps(eps)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def extra_options(**opts: object) -> str:
    """``extra_repr`` suffix listing normkit's options that differ from their defaults."""
    defaults = {"weight_offset": 0.0, "reduction_dims": None, "stats_dtype": None, "backend": None, "process_group": None}
    parts = [f"{k}={v!r}" for k, v in opts.items() if v != defaults.get(k)]
    return (", " + ", ".join(parts)) if parts else ""


_UNSET: object = object()


def set_options(
    module: object,
    eps: float | None = None,
    *,
    stats_dtype: object = _UNSET,
    backend: object = _UNSET,
    process_group: object = _UNSET,
) -> None:
    """The option handling every module shell shares: validate ``eps`` and ``backend``, then store
    ``stats_dtype`` / ``backend`` / ``process_group`` as attributes (only those passed: a shell
    without a backend option gets no ``backend`` attribute). Pair with :func:`options_repr` in
    ``extra_repr``; batch-dependent shells read the group back through :func:`sync_reducer`."""
    check_module_args(eps, None if backend is _UNSET else backend)  # type: ignore[arg-type]
    if process_group is not _UNSET:
        module.process_group = check_process_group(process_group)  # type: ignore[attr-defined]
    if stats_dtype is not _UNSET:
        module.stats_dtype = stats_dtype  # type: ignore[attr-defined]
    if backend is not _UNSET:
        module.backend = backend  # type: ignore[attr-defined]


def sync_reducer(module: object) -> Reducer | None:
    """The statistics engine's reducer for a batch-dependent layer: the one place ``process_group``
    becomes cross-process sums (:class:`normkit.sync.GroupSum`).

    Only in training: eval normalizes with running statistics (or per-process batch statistics when
    a layer keeps none) and never communicates, so ranks may call eval a different number of times.
    An explicit ``reducer`` attribute (BatchNorm's older hook) wins when set.

    The reducer carries the layer's :class:`normkit.sync.ShiftMemory` (created on the first synced
    call, kept as the plain attribute ``_sync_shifts``): the synchronized means of its previous call,
    the shifts its next sums are taken about (:func:`normkit.stats.synced_sums`) — no cancellation,
    one collective per call after the first.
    """
    explicit = getattr(module, "reducer", None)
    if explicit is not None:
        return explicit
    group = getattr(module, "process_group", None)
    if group is None or not module.training:  # type: ignore[attr-defined]
        return None
    memory = getattr(module, "_sync_shifts", None)
    if memory is None:
        memory = ShiftMemory()
        module._sync_shifts = memory  # type: ignore[attr-defined]  # a plain attribute: not state
    return GroupSum(group, memory)


class FastPath:
    """Mixin for module shells with a per-configuration fast path on the default backend.

    torch's norm modules cost a few Python calls per forward; normkit's resolve the backend per call
    (:func:`normkit.backend.resolve`), which on a 64×256 LayerNorm was 10–30% of the whole call. A
    shell instead computes, once per configuration, what that resolution depends on besides the
    input (:meth:`_replan`: which options are set, the ``backend`` attribute, the bound of
    :func:`normkit.backend.native_below`) and stores it in plain instance attributes (``_nk_*``), so
    its ``forward`` tests one integer, the input's device and size and the thread's
    ``backend.thread_state.plain`` before calling ATen's op directly. The plan is recomputed when
    an attribute named in ``_PLAN_ATTRS`` is assigned or deleted (``m.backend = "eager"``,
    ``m.weight_offset = 1``, ``m.bias = None``), when a parameter is registered, and after unpickling;
    ``.to()``, ``.train()`` and ``load_state_dict`` change nothing the plan holds. Shells call
    :meth:`_replan` at the end of ``__init__`` (until then the class default, no fast path, applies).

    The fast paths read parameters from ``self._parameters`` rather than as attributes: ``self.weight``
    is a failed instance lookup (an AttributeError built and caught in C) and then
    ``Module.__getattr__``, ~0.8 µs per parameter — a tenth of a 2×16×64 DyT forward. That dict is
    where ``torch.func.functional_call`` swaps tensors in, so those calls stay exact; code that moves
    a parameter out of it behind the module's back (``torch.nn.utils.weight_norm``, a
    parametrization's property) makes the lookup raise ``KeyError``, which sends the call to the full
    path (attribute access, the same result, the full path's errors).
    """

    _PLAN_ATTRS: frozenset[str] = frozenset()

    def _replan(self) -> None:
        """Recompute the plan's ``_nk_*`` attributes from the current options; each shell overrides it.
        The base plans nothing, so a shell's class defaults (no fast path) stay in force."""

    def _plan_set(self, **attrs: Any) -> None:
        """Store plan values in the instance dict directly (no ``nn.Module.__setattr__``, no re-plan)."""
        self.__dict__.update(attrs)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self._PLAN_ATTRS and "_nk_ready" in self.__dict__:
            self._replan()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in self._PLAN_ATTRS and "_nk_ready" in self.__dict__:
            self._replan()

    def register_parameter(self, name: str, param: Any) -> None:
        super().register_parameter(name, param)  # type: ignore[misc]
        if "_nk_ready" in self.__dict__:
            self._replan()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_nk_ready"] = True
        try:
            self._replan()
        except AttributeError:  # pickled before an option existed: no fast path (the class default), still loads
            pass

    def _plan_ready(self) -> None:
        """End of ``__init__``: compute the plan; from now on option changes re-plan."""
        self.__dict__["_nk_ready"] = True
        self._replan()


def options_repr(module: object, **opts: object) -> str:
    """``extra_repr`` suffix: ``opts`` then the ``stats_dtype`` / ``backend`` that :func:`set_options`
    stored on ``module``, each shown only when it differs from its default (:func:`extra_options`)."""
    for name in ("stats_dtype", "backend", "process_group"):
        if name in vars(module):
            opts[name] = vars(module)[name]
    return extra_options(**opts)


def largest_group_count(channels: int, at_most: int = 8) -> int:
    """The largest divisor of ``channels`` that is ≤ ``at_most`` (a valid group count for any C)."""
    return max(g for g in range(1, min(at_most, channels) + 1) if channels % g == 0)


def group_sample_kwargs(channels: int) -> dict[str, int]:
    """``sample_kwargs`` for grouped norms whose default of 32 groups need not divide small C."""
    return {"num_groups": largest_group_count(channels)}


def describe(t: object) -> object:
    """What an error message should show for a bad input: its shape if a tensor, else its type name."""
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__

