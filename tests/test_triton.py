"""normkit's Triton kernels (``backend="triton"``) under Triton's interpreter, on CPU tensors.

Triton fixes the interpreter mode of its library when ``triton`` is first imported, so this module
imports it with ``TRITON_INTERPRET=1`` set (then removes the variable again so other test modules
see the default); where another test imported ``triton`` first (Inductor does), the module runs
itself in a fresh process instead (``test_in_fresh_process``). While its tests run the variable is
set: the public layers with ``backend="triton"`` then take CPU tensors and run the same code path
as on a GPU. References are the norms' formulas written out below, differentiated by autograd, in
float64. The interpreter is slow (numpy per program): shapes stay small; ``MAX_TILE_BYTES`` is
lowered to run the looping (long-row) paths on short rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
    finally:
        del os.environ["TRITON_INTERPRET"]
pytest.importorskip("triton")

import normkit  # noqa: E402
import normkit.functional as F  # noqa: E402
from normkit import backend as B  # noqa: E402
from normkit.kernels.triton import launch  # noqa: E402

D64 = torch.float64
IN_PROCESS = launch.imported_for_interpreter()


def test_in_fresh_process():
    """Where ``triton`` was imported without the interpreter, run this module again in a new process."""
    if IN_PROCESS:
        pytest.skip("the tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.fixture(autouse=True)
def _interpret(request):
    if request.node.name == "test_in_fresh_process":
        yield
        return
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: run by test_in_fresh_process")
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if prev is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = prev


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 float64 values: every reduction longer than that takes the multi-pass loops."""
    monkeypatch.setattr(launch, "MAX_TILE_BYTES", 64)


# ---------------------------------------------------------------- plain references


def ref_layer_norm(x, w, b, eps, center=True):
    """y = (x − mean)/sqrt(var + eps)·w + b over the last dim (biased var); RMS: mean = 0, var = mean(x²)."""
    mean = x.mean(-1, keepdim=True) if center else torch.zeros_like(x[..., :1])
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def ref_group_norm(x, groups, w, b, eps):
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y * w.reshape(shape) + b.reshape(shape)


def ref_dyt(x, alpha, w, b, channels_last):
    shape = (-1,) if channels_last else (-1,) + (1,) * (x.dim() - 2)
    return torch.tanh(alpha * x) * w.reshape(shape) + b.reshape(shape)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _compare(fn, ref, inputs, atol=1e-10):
    """Outputs and gradients (against a random cotangent) of ``fn`` and ``ref`` on copies of ``inputs``."""
    a, b = _leaves(*inputs), _leaves(*inputs)
    ya, yb = fn(*a), ref(*b)
    ya, yb = (ya if isinstance(ya, tuple) else (ya,)), (yb if isinstance(yb, tuple) else (yb,))
    gens = [torch.randn_like(t) for t in yb]
    for u, v in zip(ya, yb):
        torch.testing.assert_close(u, v, atol=atol, rtol=atol)
    ga = torch.autograd.grad(ya, [t for t in a if t is not None], gens)
    gb = torch.autograd.grad(yb, [t for t in b if t is not None], gens)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=atol * 10, rtol=atol * 10)


# ---------------------------------------------------------------- rows: LayerNorm, RMSNorm


@pytest.mark.parametrize("width", [1, 3, 127, 1000, 4097])
def test_rows_odd_widths(width):
    x = torch.randn(2, width, dtype=D64) * 3 + 1
    w, b = torch.randn(width, dtype=D64), torch.randn(width, dtype=D64)
    _compare(lambda x, w, b: F.layer_norm(x, width, w, b, backend="triton"),
             lambda x, w, b: ref_layer_norm(x, w, b, 1e-5), (x, w, b))
    _compare(lambda x, w: F.rms_norm(x, width, w, 1e-6, backend="triton"),
             lambda x, w: ref_layer_norm(x, w, None, 1e-6, center=False), (x, w))


def test_rows_variants_no_affine_no_bias_offset():
    x = torch.randn(3, 2, 24, dtype=D64)
    w, b = torch.randn(24, dtype=D64) * 0.1, torch.randn(24, dtype=D64)
    _compare(lambda x: F.layer_norm(x, 24, backend="triton"), lambda x: ref_layer_norm(x, None, None, 1e-5), (x,))
    _compare(lambda x, w: F.layer_norm(x, 24, w, backend="triton"), lambda x, w: ref_layer_norm(x, w, None, 1e-5), (x, w))
    # Gemma-style weight offset: y = x̂ · (1 + w)
    _compare(lambda x, w: F.rms_norm(x, 24, w, 1e-6, weight_offset=1.0, backend="triton"),
             lambda x, w: ref_layer_norm(x, 1.0 + w, None, 1e-6, center=False), (x, w))
    # RMSNorm with a bias
    _compare(lambda x, w, b: F.rms_norm(x, 24, w, 1e-6, bias=b, backend="triton"),
             lambda x, w, b: ref_layer_norm(x, w, b, 1e-6, center=False), (x, w, b))


def test_per_head_weight():
    """QK-norm: statistics per head over head_dim, a weight per (head, head_dim)."""
    q = torch.randn(2, 5, 3, 8, dtype=D64)  # (B, T, H, Dh)
    w = torch.randn(3, 8, dtype=D64)
    _compare(lambda q, w: F.normalize(q, -1, feature_dims=(-2, -1), center=False, weight=w, eps=1e-6, backend="triton"),
             lambda q, w: ref_layer_norm(q, w, None, 1e-6, center=False), (q, w))
    m = normkit.RMSNorm((3, 8), eps=1e-6, reduction_dims=1, backend="triton").double()
    with torch.no_grad():
        m.weight.copy_(w)
    torch.testing.assert_close(m(q), ref_layer_norm(q, w, None, 1e-6, center=False))


def test_long_rows_loop(small_tiles):
    x = torch.randn(2, 40, dtype=D64) + 5
    w, b = torch.randn(40, dtype=D64), torch.randn(40, dtype=D64)
    _compare(lambda x, w, b: F.layer_norm(x, 40, w, b, backend="triton"),
             lambda x, w, b: ref_layer_norm(x, w, b, 1e-5), (x, w, b))
    _compare(lambda x, w: F.rms_norm(x, 40, w, 1e-6, backend="triton"),
             lambda x, w: ref_layer_norm(x, w, None, 1e-6, center=False), (x, w))


def test_float32_against_float64_reference():
    x = torch.randn(4, 1000) * 10 + 3
    w, b = torch.randn(1000), torch.randn(1000)
    y = F.layer_norm(x, 1000, w, b, backend="triton")
    ref = ref_layer_norm(x.double(), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(y, ref.float(), atol=2e-5, rtol=1e-5)
    assert y.dtype == torch.float32


def test_nan_row_propagates():
    x = torch.randn(3, 16, dtype=D64)
    x[1, 4] = float("nan")
    y = F.layer_norm(x, 16, torch.ones(16, dtype=D64), backend="triton")
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# ---------------------------------------------------------------- fused add + norm


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_add_norm_returns_sum(norm, small_tiles):
    x, r = torch.randn(3, 20, dtype=D64), torch.randn(3, 20, dtype=D64)
    w, b = torch.randn(20, dtype=D64), torch.randn(20, dtype=D64)
    center = norm == "layernorm"

    def ref(x, r, w, b):
        s = x + r
        return ref_layer_norm(s, w, b if center else None, 1e-5, center), s

    _compare(lambda x, r, w, b: F.add_norm(x, r, 20, w, b, 1e-5, norm=norm, backend="triton"),
             ref, (x, r, w, b if center else None))


# ---------------------------------------------------------------- channels-first, GroupNorm, InstanceNorm


@pytest.mark.parametrize("tiles", ["one", "loop"])
def test_channels_first_and_group_norm(tiles, request):
    if tiles == "loop":
        request.getfixturevalue("small_tiles")
    x = torch.randn(2 if tiles == "one" else 1, 12, 2, 3, dtype=D64) * 2 + 1
    w, b = torch.randn(12, dtype=D64), torch.randn(12, dtype=D64)

    def ln2d(x, w, b):
        return ref_layer_norm(x.movedim(1, -1), w, b, 1e-6).movedim(-1, 1)

    _compare(lambda x, w, b: F.layer_norm2d(x, w, b, 1e-6, backend="triton"), ln2d, (x, w, b))
    _compare(lambda x, w: F.rms_norm2d(x, w, 1e-6, backend="triton"),
             lambda x, w: ref_layer_norm(x.movedim(1, -1), w, None, 1e-6, center=False).movedim(-1, 1), (x, w))
    _compare(lambda x, w, b: F.group_norm(x, 4, w, b, backend="triton"),
             lambda x, w, b: ref_group_norm(x, 4, w, b, 1e-5), (x, w, b))
    _compare(lambda x, w, b: F.instance_norm(x, weight=w, bias=b, backend="triton"),
             lambda x, w, b: ref_group_norm(x, 12, w, b, 1e-5), (x, w, b))


def test_modules_take_the_same_path():
    x = torch.randn(2, 8, 4, 4, dtype=D64)
    with B.record() as calls:
        normkit.GroupNorm(num_groups=2, num_channels=8, backend="triton").double()(x)
        normkit.LayerNorm2d(8, backend="triton").double()(x)
        normkit.LayerNorm(4, backend="triton").double()(x)
    assert ("normalize", "triton") in calls and ("normalize", "eager") not in calls


# ---------------------------------------------------------------- DyT


@pytest.mark.parametrize("channels_last", [True, False])
def test_dyt(channels_last, small_tiles):
    x = torch.randn(2, 12, 1, 10, dtype=D64) * 3
    c = x.shape[-1] if channels_last else x.shape[1]
    alpha = torch.tensor([0.7], dtype=D64)
    w, b = torch.randn(c, dtype=D64), torch.randn(c, dtype=D64)
    from normkit.kernels import pointwise

    _compare(lambda x, a, w, b: pointwise.dyt(x, a, w, b, channels_last, "triton"),
             lambda x, a, w, b: ref_dyt(x, a, w, b, channels_last), (x, alpha, w, b))
    m = normkit.DyT(c, channels_last=channels_last, backend="triton").double()
    with B.record() as calls:
        m(x).sum().backward()
    assert ("dyt", "triton") in calls and m.weight.grad is not None


# ---------------------------------------------------------------- exactness and determinism


def test_gradcheck():
    x = torch.randn(2, 3, dtype=D64, requires_grad=True)
    w, b = torch.randn(3, dtype=D64, requires_grad=True), torch.randn(3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm(x, 3, w, b, backend="triton"), (x, w, b))
    g = torch.randn(1, 4, 2, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, w: F.group_norm(g, 2, torch.cat([w, w[:1]]), None, backend="triton"), (g, w))


def test_double_backward_goes_through_the_math():
    x = torch.randn(2, 6, dtype=D64, requires_grad=True)
    w = torch.randn(6, dtype=D64, requires_grad=True)
    (gx,) = torch.autograd.grad(F.layer_norm(x, 6, w, backend="triton").pow(2).sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(ref_layer_norm(x, w, None, 1e-5).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(torch.autograd.grad(gx.sum(), w)[0], torch.autograd.grad(gx_ref.sum(), w)[0])


def test_weight_grads_are_bitwise_reproducible():
    x = torch.randn(9, 24)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    runs = []
    for _ in range(2):
        y = F.layer_norm(x, 24, w, b, backend="triton")
        runs.append(torch.autograd.grad(y, (w, b), torch.ones_like(y)))
    assert all(torch.equal(u, v) for u, v in zip(*runs))


# ---------------------------------------------------------------- backend wiring


def test_unsupported_configurations_fall_back_to_eager():
    x = torch.randn(4, 3, 5, dtype=D64)
    with B.record() as calls:
        y = F.layer_norm(x, 5, stats_dtype=torch.float64, backend="triton")  # the accumulation dtype: kernels
        z = F.layer_norm(x, 5, stats_dtype=torch.float32, backend="triton")  # another statistics dtype: eager
    torch.testing.assert_close(y, ref_layer_norm(x, None, None, 1e-5))
    torch.testing.assert_close(z, ref_layer_norm(x, None, None, 1e-5), atol=1e-6, rtol=1e-6)
    assert ("normalize", "triton") in calls and ("normalize", "eager") in calls


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        F.layer_norm(torch.randn(2, 4), 4, backend="triton")


def test_auto_keeps_aten_on_cuda_until_measured():
    import normkit.kernels.triton  # noqa: F401 - registers the kernels

    class FakeCuda:
        is_cuda, is_cpu, dtype = True, False, torch.float32

        def numel(self):
            return 1 << 20

    for op in ("layer_norm", "rms_norm", "group_norm", "add_norm"):
        assert op in B._triton_kernels
        assert B.resolve(None, FakeCuda(), op, True) == "native"


# ---------------------------------------------------------------- operators


def test_operators_registrations():
    from normkit.kernels.triton import ops  # noqa: F401 - registers torch.ops.normkit.triton_*

    x, r = torch.randn(2, 1, 5, 1, dtype=D64, requires_grad=True), torch.randn(2, 1, 5, 1, dtype=D64)
    w = torch.randn(5, dtype=D64, requires_grad=True)
    torch.library.opcheck(torch.ops.normkit.triton_norm.default, (x, r, w, None, False, True, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    a = torch.tensor([0.5], dtype=D64, requires_grad=True)
    xd = torch.randn(2, 3, 4, dtype=D64, requires_grad=True)
    torch.library.opcheck(torch.ops.normkit.triton_dyt.default, (xd, a, None, None, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_graph_keeps_the_operator():
    torch._dynamo.reset()
    m = normkit.RMSNorm(8, eps=1e-6, backend="triton").double()
    x = torch.randn(3, 8, dtype=D64, requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    ref = ref_layer_norm(x, m.weight, None, 1e-6, center=False)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (x, m.weight), g), torch.autograd.grad(ref, (x, m.weight), g))


def test_export_records_the_operator():
    m = normkit.RMSNorm(8, eps=1e-6, backend="triton").double()
    x = torch.randn(3, 8, dtype=D64)
    ep = torch.export.export(m, (x,))
    assert torch.ops.normkit.triton_norm.default in [n.target for n in ep.graph.nodes]
    torch.testing.assert_close(ep.module()(x), m(x))


def test_gpu_benchmark_table_runs_under_the_interpreter():
    """``normkit kernels --device cuda``'s code, smoke-run on CPU tensors (no timing is meaningful here)."""
    from normkit.bench.kernels import format_gpu_row, run_device

    rows = run_device("interpret", ops=("rmsnorm",), widths=(48,), dtypes=("fp32",), echo=None)
    assert [r.impl for r in rows][:2] == ["torch", "triton"]
    assert rows[1].max_err < 1e-5 and rows[1].fwdbwd_ms > 0
    assert format_gpu_row(rows[1]).startswith("rmsnorm")
