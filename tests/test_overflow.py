"""Statistics that do not overflow: finite float32/bfloat16 input far from 1 gives the right output.

A float32 row with |x − μ| past ~1.8e19 has a variance past FLT_MAX; ``rsqrt(inf + eps) = 0`` used
to zero the output (issue 12, item 3). Every check compares against the plain float64 formula
written here, ``(x − μ)/sqrt(σ² + eps)`` (biased σ², μ = 0 for RMS), not against normkit's code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normkit
from normkit.functional.layer_norm import ATEN_CHECK_MIN_NUMEL
from normkit.kernels.canonical import safe_rstd

SCALES = (1e30, 1e-30, 3e37)
EPS = 1e-5


def formula(x: torch.Tensor, dims: tuple[int, ...], center: bool, eps: float = EPS) -> torch.Tensor:
    """The reference in float64: normalize over ``dims`` (biased variance)."""
    x = x.double()
    if center:
        mu = x.mean(dims, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(dims, keepdim=True) + eps)
    return x / torch.sqrt((x**2).mean(dims, keepdim=True) + eps)


# module factory, input shape, reduced dims of the reference, centred
CASES = {
    "layernorm": (lambda b: normkit.LayerNorm(8, backend=b), (4, 5, 8), (-1,), True),
    "rmsnorm": (lambda b: normkit.RMSNorm(8, eps=EPS, backend=b), (4, 5, 8), (-1,), False),
    "layernorm2d": (lambda b: normkit.LayerNorm2d(8, backend=b), (4, 8, 3, 3), (1,), True),
    "rmsnorm2d": (lambda b: normkit.RMSNorm2d(8, eps=EPS, backend=b), (4, 8, 3, 3), (1,), False),
    "groupnorm": (lambda b: normkit.GroupNorm(num_channels=8, num_groups=2, backend=b), (4, 8, 3, 3), None, True),
    "instancenorm": (lambda b: normkit.InstanceNorm(8, backend=b), (4, 8, 3, 3), (2, 3), True),
    "batchnorm": (lambda b: normkit.BatchNorm2d(8, backend=b), (4, 8, 3, 3), (0, 2, 3), True),
}


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    _, _, dims, center = CASES[name]
    if dims is None:  # GroupNorm, 2 groups of 4 channels
        return formula(x.reshape(x.shape[0], 2, -1), (2,), center).reshape(x.shape)
    return formula(x, dims, center)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", ["eager", "kernels"])
@pytest.mark.parametrize("name", list(CASES))
def test_far_from_one_matches_float64(name: str, backend: str, scale: float) -> None:
    make, shape, _, _ = CASES[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * scale
    y = make(backend)(x)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference(name, x)) < 1e-6


@pytest.mark.parametrize("backend", ["eager", "kernels"])
@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "groupnorm"])
def test_gradients_at_1e30(name: str, backend: str) -> None:
    make, shape, _, _ = CASES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 1e30
    gy = torch.randn(shape, generator=g)
    xf = x.clone().requires_grad_()
    m = make(backend)
    (m(xf) * gy).sum().backward()
    xd = x.double().requires_grad_()
    (reference(name, xd) * gy.double()).sum().backward()
    assert rel_err(xf.grad, xd.grad) < 1e-5
    assert rel_err(m.weight.grad, (reference(name, x) * gy.double()).sum((0, 2, 3) if x.dim() == 4 else (0, 1))) < 1e-5


def test_masked_statistics_at_1e30() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 8, generator=g) * 1e30
    mask = torch.rand(4, 5, 8, generator=g) > 0.3
    mask[..., 0] = True
    xf = x.clone().requires_grad_()
    y = normkit.functional.layer_norm(xf, 8, mask=mask)
    y.sum().backward()
    xd, w = x.double(), mask.double()
    mu = (xd * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    var = (((xd - mu) * w) ** 2).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    assert rel_err(y, (xd - mu) / torch.sqrt(var + EPS)) < 1e-6
    assert torch.isfinite(xf.grad).all()


def test_branch_free_under_compile() -> None:
    """Under a compiler safe_rstd has no data-dependent branch (fullgraph traces) and is right."""
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3))
    x[1] *= 1e30
    var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
    fn = torch.compile(lambda x, v, m: safe_rstd(x, (2,), v, EPS, mean=m), backend="eager", fullgraph=True)
    r = fn(x, var, mean)
    xd = x.double()
    assert rel_err(r, 1 / torch.sqrt(xd.var(-1, correction=0, keepdim=True) + EPS)) < 1e-6


@pytest.mark.slow
def test_inductor_at_1e30() -> None:
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3)) * 1e30
    y = normkit.LayerNorm(8, backend="inductor")(x)
    assert rel_err(y, formula(x, (-1,), True)) < 1e-6


def test_bfloat16_at_1e20() -> None:
    x = (torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(4)) * 1e20).bfloat16()
    for backend in ("eager", "kernels"):
        m = normkit.LayerNorm(8, backend=backend).bfloat16()
        assert rel_err(m(x), formula(x, (-1,), True)) < 1e-2  # bf16 output rounding


def test_float64_past_its_range() -> None:
    x = torch.randn(4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1e200
    y = normkit.LayerNorm(8, backend="eager").double()(x)
    xs = x / 1e200  # the same rows at scale 1: the normalized output is scale-invariant
    assert rel_err(y, formula(xs, (-1,), True, eps=0.0)) < 1e-12


@pytest.mark.parametrize("backend", ["eager", "kernels"])
@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "layernorm2d"])
def test_nan_rows_stay_nan_next_to_overflowed_rows(name: str, backend: str) -> None:
    make, shape, dims, _ = CASES[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    x[0] = x[0] * 1e30  # sample 0 takes the rescue
    x[1, 2] = float("nan")  # one NaN in sample 1
    y = make(backend)(x)
    nan_rows = torch.isnan(x).any(dim=dims, keepdim=True).expand_as(x)
    assert torch.isnan(y[nan_rows]).all()
    assert rel_err(y[~nan_rows], reference(name, x)[~nan_rows]) < 1e-6


@pytest.mark.parametrize("backend", ["eager", "kernels"])
@pytest.mark.parametrize("center", [True, False])
def test_inf_input_gives_nan(backend: str, center: bool) -> None:
    """As IEEE arithmetic on the formula: LayerNorm's mean is inf, the row is NaN; RMSNorm's mean
    square is inf, so x/inf = 0 and inf/inf = NaN (as ``torch.nn.functional.rms_norm``)."""
    x = torch.randn(3, 8)
    x[1, 3] = float("inf")
    m = normkit.LayerNorm(8, backend=backend) if center else normkit.RMSNorm(8, eps=EPS, backend=backend)
    y = m(x)
    assert torch.isfinite(y[[0, 2]]).all()
    if center:
        assert torch.isnan(y[1]).all()
    else:
        assert torch.isnan(y[1, 3]) and (y[1, torch.arange(8) != 3] == 0).all()


def test_ordinary_input_is_bitwise_the_plain_formula() -> None:
    """Rows whose variance is finite keep ``rsqrt(var + eps)`` bit for bit (eager path unchanged)."""
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(7))
    var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
    assert torch.equal(normkit.LayerNorm(32, backend="eager")(x), (x - mean) * torch.rsqrt(var + EPS))
    assert torch.equal(safe_rstd(x, (1,), var, EPS, mean=mean), torch.rsqrt(var + EPS))
    var[2] = float("inf")  # the rescue: other rows unchanged, row 2 from the scaled input
    r = safe_rstd(x, (1,), var, EPS, mean=mean)
    keep = torch.arange(6) != 2
    assert torch.equal(r[keep], torch.rsqrt(var[keep] + EPS))


def test_aten_path_checked_from_threshold() -> None:
    rows = ATEN_CHECK_MIN_NUMEL // 1024
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(8))
    m = normkit.LayerNorm(1024)  # backend "auto": ATen's op on CPU
    assert torch.equal(m(x), TF.layer_norm(x, (1024,), m.weight, m.bias, EPS))  # ordinary: ATen's output
    x[3] *= 1e30
    ref = formula(x, (-1,), True)
    assert rel_err(m(x), ref) < 1e-6
    assert rel_err(normkit.functional.layer_norm(x, 1024), ref) < 1e-6
    assert rel_err(normkit.functional.add_norm(x, torch.zeros_like(x), 1024)[0], ref) < 1e-6


def _big(shape: tuple[int, ...], seed: int = 9) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert x.numel() >= ATEN_CHECK_MIN_NUMEL
    return x


def test_aten_batch_norm_checked_and_running_stats_updated_once() -> None:
    """BatchNorm on auto (ATen's op): an overflowed channel reruns on normkit's statistics, and the
    running buffers are updated once, from the float64-exact batch moments."""
    x = _big((8, 64, 32, 32))
    m = normkit.BatchNorm2d(64)
    assert torch.equal(m(x), TF.batch_norm(x, None, None, m.weight, m.bias, True, 0.1, EPS))  # ordinary
    x = x.clone()
    x[:, 5] *= 1e18  # channel 5: variance 1e36 fits float32, ATen's sum of squares does not
    m = normkit.BatchNorm2d(64)
    y = m(x)
    assert rel_err(y, formula(x, (0, 2, 3), True)) < 1e-5
    xd = x.double()
    n = xd.numel() // 64
    mean = xd.mean((0, 2, 3))
    unbiased = xd.var((0, 2, 3), correction=0) * n / (n - 1)
    assert torch.allclose(m.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.running_var.double(), 0.9 + 0.1 * unbiased, rtol=1e-5)
    assert m.num_batches_tracked.item() == 1


def test_aten_group_and_instance_norm_checked() -> None:
    x = _big((8, 64, 32, 32)) * 1e30
    gn = normkit.GroupNorm(64, num_groups=8)
    ref = formula(x.reshape(8, 8, -1), (2,), True).reshape(x.shape)
    assert rel_err(gn(x), ref) < 1e-5
    assert rel_err(normkit.functional.group_norm(x, 8), ref) < 1e-5
    # bfloat16: normkit's kernels take float32/float64 only, so auto runs ATen's op on any size
    xb = (_big((8, 64, 32, 32)) * 1e20).bfloat16()
    inorm = normkit.InstanceNorm(64, track_running_stats=True)
    assert rel_err(inorm(xb), formula(xb.double(), (2, 3), True)) < 1e-2
    assert torch.isfinite(inorm.running_mean).all()
    rows = xb.reshape(-1, 1024)
    assert rel_err(normkit.RMSNorm(1024, eps=EPS).bfloat16()(rows), formula(rows.double(), (-1,), False)) < 1e-2


def test_aten_checks_keep_gradients() -> None:
    x = (_big((8, 64, 32, 32)) * 1e30).requires_grad_()
    m = normkit.BatchNorm2d(64)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (m(x) * g).sum().backward()
    xd = x.detach().double().requires_grad_()
    (formula(xd, (0, 2, 3), True) * g.double()).sum().backward()
    assert rel_err(x.grad * 1e30, xd.grad * 1e30) < 1e-4
