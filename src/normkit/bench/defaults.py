"""``normkit kernels --defaults``: normkit's layers on the default backend against torch's modules.

What a user sees after swapping ``torch.nn.LayerNorm`` for ``normkit.LayerNorm`` without choosing a
backend: for every core norm, at a large benchmark shape and at small shapes (where the Python cost
of a call dominates), the time of

* ``train`` — forward + backward (gradients of the input and every parameter), training mode;
* ``fwd`` — forward under ``torch.no_grad`` (training mode: batch statistics);
* ``eval`` — forward under ``torch.no_grad`` in eval mode (BatchNorm: running statistics),

for torch's module and for normkit's, interleaved in the same run (shuffled order in each round,
median of ``reps`` rounds; each sample repeats the call enough times to last about 2 ms). ``ratio`` is
normkit / torch; ``runs`` names the implementation ``"auto"`` chose (``native``: ATen's op;
``kernels``: normkit's C++ CPU kernels; ``eager``: normkit's autograd math).

The baseline is torch's own module where torch has one, else the plain torch code a user writes
instead: timm's permute + ``F.layer_norm`` for LayerNorm2d (``F.rms_norm`` for RMSNorm2d),
``w · tanh(αx) + b`` for DyT, ``g · x / max(‖x‖, eps)`` for ScaleNorm, and ``x + r`` then
``nn.LayerNorm`` for the fused add + norm.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

import normkit
from normkit.backend import record

TOKENS, SMALL_TOKENS, TINY_TOKENS = (8192, 1024), (64, 256), (2, 16, 64)
IMAGES, SMALL_IMAGES = (32, 64, 56, 56), (8, 64, 14, 14)


class _PermuteNorm2d(nn.Module):
    """timm's LayerNorm2d / RmsNorm2d: move channels last, torch's norm, move them back."""

    def __init__(self, c: int, eps: float, rms: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = None if rms else nn.Parameter(torch.zeros(c))
        self.eps, self.rms = eps, rms

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        if self.rms:
            x = TF.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        else:
            x = TF.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _PlainDyT(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


class _PlainScaleNorm(nn.Module):
    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(c) ** 0.5))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.scale / x.norm(dim=-1, keepdim=True).clamp_min(self.eps))


class _AddNorm(nn.Module):
    """Pre-norm residual step ``(norm(x + r), x + r)``; ``fused`` uses normkit's ``forward_add``."""

    def __init__(self, norm: nn.Module, fused: bool) -> None:
        super().__init__()
        self.norm, self.fused = norm, fused

    def forward(self, x: Tensor) -> Tensor:
        r = x  # the residual stream: the same tensor keeps the benchmark's input list short
        if self.fused:
            y, s = self.norm.forward_add(x, r)
        else:
            s = x + r
            y = self.norm(s)
        return y + s  # both outputs reach the loss, as in a transformer block


@dataclass(frozen=True)
class Case:
    norm: str
    shapes: tuple[tuple[int, ...], ...]
    torch_module: Callable[[int], nn.Module]
    normkit_module: Callable[[int], nn.Module]
    modes: tuple[str, ...] = ("train", "fwd")
    faster: float | None = None  # target: at least this many times faster than torch (else ≤ 1.05x)


def _channels(shape: tuple[int, ...], tokens: bool) -> int:
    return shape[-1] if tokens else shape[1]


TOKEN_SHAPES = (TOKENS, SMALL_TOKENS, TINY_TOKENS)
IMAGE_SHAPES = (IMAGES, SMALL_IMAGES)

CASES = (
    Case("layernorm", TOKEN_SHAPES, lambda c: nn.LayerNorm(c), lambda c: normkit.LayerNorm(c)),
    Case("rmsnorm", TOKEN_SHAPES, lambda c: nn.RMSNorm(c, eps=1e-6), lambda c: normkit.RMSNorm(c, eps=1e-6), faster=3.0),
    Case("add_layernorm", TOKEN_SHAPES, lambda c: _AddNorm(nn.LayerNorm(c), False),
         lambda c: _AddNorm(normkit.LayerNorm(c), True)),
    Case("scalenorm", TOKEN_SHAPES, lambda c: _PlainScaleNorm(c), lambda c: normkit.ScaleNorm(c)),
    Case("dyt", TOKEN_SHAPES, lambda c: _PlainDyT(c), lambda c: normkit.DyT(c)),
    Case("layernorm2d", IMAGE_SHAPES, lambda c: _PermuteNorm2d(c, 1e-6, False), lambda c: normkit.LayerNorm2d(c, eps=1e-6)),
    Case("rmsnorm2d", IMAGE_SHAPES, lambda c: _PermuteNorm2d(c, 1e-6, True), lambda c: normkit.RMSNorm2d(c, eps=1e-6),
         faster=3.0),
    Case("groupnorm", IMAGE_SHAPES, lambda c: nn.GroupNorm(32, c), lambda c: normkit.GroupNorm(c, 32)),
    Case("instancenorm", IMAGE_SHAPES, lambda c: nn.InstanceNorm2d(c, affine=True),
         lambda c: normkit.InstanceNorm(c, affine=True)),
    Case("batchnorm", IMAGE_SHAPES, lambda c: nn.BatchNorm2d(c), lambda c: normkit.BatchNorm2d(c),
         modes=("train", "fwd", "eval")),
)


@dataclass
class Row:
    norm: str
    shape: tuple[int, ...]
    mode: str
    torch_ms: float
    normkit_ms: float
    runs: str
    faster: float | None

    @property
    def ratio(self) -> float:
        return self.normkit_ms / self.torch_ms

    @property
    def meets_target(self) -> bool:
        return self.ratio <= (1 / self.faster if self.faster else 1.05)


def _sync_params(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the parameters of ``src`` where names and shapes match (same outputs)."""
    theirs = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            q = theirs.get(name, theirs.get(name.split(".")[-1]))
            if q is not None and q.shape == p.shape:
                p.copy_(q)


def _timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms per call of each function; each sample runs it enough times to last ~2 ms."""
    inner = {}
    for k, f in fns.items():
        f()
        t = time.perf_counter()
        f()
        inner[k] = max(1, min(1000, int(2e-3 / max(time.perf_counter() - t, 1e-7))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            f, n = fns[k], inner[k]
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t) * 1e3 / n)
    return {k: statistics.median(v) for k, v in times.items()}


def _bench_case(case: Case, shape: tuple[int, ...], reps: int) -> list[Row]:
    tokens = case.shapes is TOKEN_SHAPES
    c = _channels(shape, tokens)
    torch.manual_seed(0)
    ref, ours = case.torch_module(c), case.normkit_module(c)
    _sync_params(ref, ours)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)  # same layer, else the timing means nothing

    def train(m: nn.Module) -> Callable[[], object]:
        ps = [p for p in m.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(m(x), [x, *ps], g)

    def fwd(m: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return m(x)

        return call

    rows = []
    for mode in case.modes:
        for m in (ref, ours):
            m.train(mode != "eval")
        make = train if mode == "train" else fwd
        with record() as calls:
            make(ours)()
        runs = calls[-1][1] if calls else "eager"
        ms = _timed({"torch": make(ref), "normkit": make(ours)}, reps)
        rows.append(Row(case.norm, shape, mode, ms["torch"], ms["normkit"], runs, case.faster))
    return rows


HEADER = f"{'norm':<15}{'shape':<15}{'mode':<7}{'torch ms':>10}{'normkit ms':>12}{'ratio':>8}  {'runs':<9}target"


def format_row(r: Row) -> str:
    shape = "x".join(map(str, r.shape))
    want = f"<= {1 / r.faster:.2f}x" if r.faster else "<= 1.05x"
    mark = "ok" if r.meets_target else "MISS"
    return (
        f"{r.norm:<15}{shape:<15}{r.mode:<7}{r.torch_ms:>10.4f}{r.normkit_ms:>12.4f}{r.ratio:>7.2f}x  "
        f"{r.runs:<9}{want} {mark}"
    )


def run(
    norms: list[str] | None = None, *, reps: int = 15, quick: bool = False, echo: Callable[[str], None] | None = print
) -> list[Row]:
    """Run the comparison (``quick``: the small shapes only) and return its rows (printed through ``echo``)."""
    rows: list[Row] = []
    for case in CASES:
        if norms and case.norm not in norms:
            continue
        for shape in case.shapes:
            if quick and shape in (TOKENS, IMAGES):
                continue
            for r in _bench_case(case, shape, reps):
                rows.append(r)
                if echo:
                    echo(format_row(r))
    if echo and rows:
        met = sum(r.meets_target for r in rows)
        echo(f"{met}/{len(rows)} rows within target (geometric mean ratio "
             f"{statistics.geometric_mean([r.ratio for r in rows]):.3f})")
    return rows
