"""The default backend: what "auto" picks, that every choice computes the same thing, and the kernels
as torch operators (opcheck, gradcheck, torch.compile without graph breaks, torch.export)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import normkit
from normkit import backend as B
from normkit import functional as F
from normkit.backend import record

CPU_KERNELS = normkit.kernels.cpu.available()


def _meta(shape, dtype=torch.float32):
    # resolution only reads device, dtype, size and contiguity: no data needed
    return torch.empty(shape, dtype=dtype, device="meta")


class _FakeCuda:
    """Stands in for a CUDA tensor in the resolver (no GPU here): the CUDA column of the table."""

    is_cuda = True
    is_cpu = False
    dtype = torch.float32

    class device:  # noqa: N801
        type = "cuda"

    def numel(self):
        return 1 << 20

    def is_contiguous(self):
        return True


@pytest.mark.parametrize(
    "op,native_ok,cpu,cuda",
    [
        ("layer_norm", True, "native", "native"),
        ("layer_norm", False, "kernels", "eager"),  # a mask or stats_dtype override: no ATen op computes it
        ("rms_norm", True, "kernels", "native"),
        ("rms_norm", False, "kernels", "eager"),
        ("layer_norm2d", True, "kernels", "native"),
        ("rms_norm2d", True, "kernels", "native"),
        ("group_norm", True, "kernels", "native"),
        ("instance_norm", True, "kernels", "native"),
        ("batch_norm", True, "native", "native"),
        ("batch_norm", False, "kernels", "eager"),  # masked BN: the engine (its layout then runs eager)
        ("add_norm", True, "kernels", "native"),
        ("dyt", True, "kernels", "eager"),
        ("normalize", False, "kernels", "eager"),
        ("evonorm", False, "eager", "eager"),  # ops outside the table run the eager math
    ],
)
@pytest.mark.skipif(not CPU_KERNELS, reason="the CPU column assumes built kernels")
def test_resolution_table(op, native_ok, cpu, cuda):
    big = torch.empty(1 << 20)
    assert B.resolve(None, big, op, native_ok) == cpu
    assert B.resolve(None, _FakeCuda(), op, native_ok) == cuda


def test_resolution_fallbacks(monkeypatch):
    big = torch.empty(1 << 20)
    # kernels take float32/float64 contiguous CPU tensors only; else ATen's op where exact, else eager
    assert B.resolve(None, big.bfloat16(), "rms_norm", True) == "native"
    assert B.resolve(None, big.bfloat16(), "rms_norm", False) == "eager"
    assert B.resolve(None, big.reshape(1024, 1024).t(), "group_norm", True) == "native"
    assert B.resolve(None, _meta(1 << 20), "rms_norm", True) == "native"  # another device type
    # an op with an inference choice: ScaleNorm's closed-form function only when a backward follows
    assert B.resolve(None, big, "scale_norm", True) == "eager"
    assert B.resolve(None, big, "scale_norm", True, needs_grad=False) == "native"
    assert B.resolve("eager", big, "scale_norm", True, needs_grad=False) == "eager"  # explicit stays explicit
    # small inputs: ATen's op, whose per-call cost is lower
    assert B.resolve(None, torch.empty(4, 8, 3, 3), "group_norm", True) == "native"
    # no kernels (no compiler): native where exact, else eager
    monkeypatch.setattr(B, "_cpu_kernels_available", lambda: False)
    assert B.resolve(None, big, "rms_norm", True) == "native"
    assert B.resolve(None, big, "rms_norm", False) == "eager"
    # a Triton kernel registered for an op wins on CUDA
    monkeypatch.setitem(B._triton_kernels, "layer_norm", lambda *a: None)
    assert B.resolve(None, _FakeCuda(), "layer_norm", True) == "triton"
    assert B.resolve(None, big, "layer_norm", True) == "native"


def test_explicit_backends_resolve_as_named():
    x = torch.empty(64, 64)
    assert B.resolve("native", x, "layer_norm", True) == "native"
    assert B.resolve("native", x, "layer_norm", False) == "eager"
    for name in ("eager", "kernels", "compiled", "inductor"):
        assert B.resolve(name, x, "layer_norm", True) == name
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        B.resolve("fast", x, "layer_norm")


def _core_calls(dtype=torch.float64):
    """(name, fn(x, w, b), shape) for the core functional norms with native-exact configurations."""
    return [
        ("layer_norm", lambda x, w, b, be: F.layer_norm(x, 16, w, b, backend=be), (12, 16)),
        ("rms_norm", lambda x, w, b, be: F.rms_norm(x, 16, w, 1e-6, backend=be), (12, 16)),
        ("add_norm", lambda x, w, b, be: sum(F.add_norm(x, x * 0.5, 16, w, b, backend=be)), (12, 16)),
        ("layer_norm2d", lambda x, w, b, be: F.layer_norm2d(x, w, b, 1e-6, backend=be), (2, 16, 3, 5)),
        ("rms_norm2d", lambda x, w, b, be: F.rms_norm2d(x, w, 1e-6, backend=be), (2, 16, 3, 5)),
        ("group_norm", lambda x, w, b, be: F.group_norm(x, 4, w, b, backend=be), (2, 16, 3, 5)),
        ("instance_norm", lambda x, w, b, be: F.instance_norm(x, weight=w, bias=b, backend=be), (2, 16, 3, 5)),
        ("batch_norm", lambda x, w, b, be: F.batch_norm(x, None, None, w, b, True, backend=be), (2, 16, 3, 5)),
        ("dyt", lambda x, w, b, be: F.dyt(x, torch.tensor([0.7], dtype=x.dtype), w, b, backend=be), (12, 16)),
    ]


@pytest.mark.parametrize("name,fn,shape", _core_calls(), ids=[c[0] for c in _core_calls()])
def test_every_backend_computes_the_same(name, fn, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    w = (torch.rand(16, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(16, dtype=torch.float64).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    results = {}
    for be in ("auto", "native", "eager", "kernels"):
        y = fn(x, w, b, be)
        results[be] = (y, *torch.autograd.grad(y, [x, w, b], g, allow_unused=True))
    for be, res in results.items():
        for got, want in zip(res, results["eager"]):
            if want is None:
                assert got is None or got.abs().max() == 0, (be, name)
                continue
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name} on {be}")


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the CPU kernels")
def test_auto_runs_what_the_table_says_at_benchmark_sizes():
    cases = [
        (normkit.LayerNorm(256), (512, 256), "native"),
        (normkit.RMSNorm(256), (512, 256), "kernels"),
        (normkit.LayerNorm2d(64), (4, 64, 16, 16), "kernels"),
        (normkit.GroupNorm(64, 8), (16, 64, 32, 32), "kernels"),
        (normkit.GroupNorm(64, 8), (4, 64, 8, 8), "native"),  # small: ATen, whose call costs less
        (normkit.BatchNorm2d(64), (4, 64, 16, 16), "native"),
        (normkit.DyT(256), (512, 256), "kernels"),
    ]
    for m, shape, want in cases:
        with record() as calls:
            m(torch.randn(shape)).sum().backward()
        assert calls and calls[-1][1] == want, (type(m).__name__, calls)


def test_masked_or_offset_layers_keep_normkit_semantics():
    # a weight offset is native-exact (ATen gets offset + w); a mask is not (statistics over kept positions)
    x = torch.randn(3, 5, 8)
    w = torch.randn(8)
    with record() as calls:
        y = F.rms_norm(x, 8, w, 1e-6, weight_offset=1.0)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    torch.testing.assert_close(y, ref)
    mask = torch.rand(3, 5, 8) > 0.3
    with record() as calls:
        y = F.layer_norm(x, 8, mask=mask)
    assert calls[0] == ("layer_norm", "kernels" if CPU_KERNELS else "eager")
    keep = mask.float()
    mean = (x * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True)
    var = ((x - mean) ** 2 * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5))


def test_native_path_keeps_normkits_errors():
    with pytest.raises(ValueError, match=r"expects input of shape \(\*, 8\)"):
        F.layer_norm(torch.randn(3, 7), 8)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        F.layer_norm(torch.randn(3, 8), 8, eps=-1.0)
    with pytest.raises(ValueError, match="weight must have 8 elements"):
        F.layer_norm(torch.randn(3, 8), 8, torch.ones(7))
    # ATen's path would broadcast a (8,) residual; normkit's add_norm refuses it on every backend
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(3, 8\)"):
        F.add_norm(torch.randn(3, 8), torch.randn(8), 8)


# ------------------------------------------------------------------ the kernels as torch operators


def _f64(*shape, lo=None):
    t = torch.randn(*shape, dtype=torch.float64)
    return (t.abs() + lo if lo is not None else t).requires_grad_()


@pytest.mark.slow  # opcheck compiles each operator (a few seconds each)
@pytest.mark.skipif(not CPU_KERNELS, reason="needs the CPU kernels")
@pytest.mark.parametrize(
    "op,args",
    [
        ("seg_norm", lambda: (_f64(6, 16), None, _f64(16, lo=0.5), _f64(16), 6, 16, 1, 1, True, 1e-5)),
        ("seg_norm", lambda: (_f64(6, 16), _f64(6, 16), _f64(16, lo=0.5), None, 6, 16, 1, 1, False, 1e-6)),
        ("seg_norm", lambda: (_f64(2, 8, 3, 3), None, _f64(8, lo=0.5), _f64(8), 8, 2, 9, 4, True, 1e-5)),
        ("cf_norm", lambda: (_f64(2, 8, 3, 3), _f64(8, lo=0.5), _f64(8), 2, 8, 9, True, 1e-6)),
        ("cf_norm", lambda: (_f64(2, 8, 3, 3), None, None, 2, 8, 9, False, 1e-6)),
        ("dyt", lambda: (_f64(6, 16), _f64(1), _f64(16), _f64(16), True)),
        ("dyt", lambda: (_f64(2, 8, 3, 3), _f64(1), _f64(8, 1, 1), None, False)),
    ],
)
def test_operators_pass_opcheck_and_gradcheck(op, args):
    torch.manual_seed(0)
    a = args()
    fn = getattr(torch.ops.normkit, op).default
    torch.library.opcheck(fn, a)
    tensors = [i for i, t in enumerate(a) if isinstance(t, torch.Tensor)]

    def first(*ts):
        full = list(a)
        for i, t in zip(tensors, ts):
            full[i] = t
        out = fn(*full)
        return out[0] if isinstance(out, tuple) else out

    inputs = tuple(a[i] for i in tensors)
    assert torch.autograd.gradcheck(first, inputs)
    if op == "seg_norm" and a[1] is not None:  # add + norm saves only the sum: no double backward
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.gradgradcheck(first, inputs)
    else:
        assert torch.autograd.gradgradcheck(first, inputs)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the CPU kernels")
@pytest.mark.slow
def test_compiled_model_keeps_the_kernels_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), normkit.RMSNorm(64), torch.nn.GELU(), normkit.DyT(64))
    x = torch.randn(512, 64, requires_grad=True)  # large enough that "auto" picks the kernels
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert cnt.frame_count == 1
    targets = {str(n.target) for n in cnt.graphs[0].graph.nodes if n.op == "call_function"}
    assert "normkit.seg_norm" in targets and "normkit.dyt" in targets, targets


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the CPU kernels")
def test_export_records_the_operator():
    x = torch.randn(2, 64, 16, 16)  # large enough that "auto" picks the kernels
    ep = torch.export.export(normkit.LayerNorm2d(64).eval(), (x,))
    assert any("normkit.cf_norm" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), TF.layer_norm(x.movedim(1, -1), (64,)).movedim(-1, 1))


def test_auto_without_a_compiler_falls_back_with_one_warning(tmp_path):
    # the compiler hidden (nothing on PATH, no $CXX): auto still runs every core layer, warns once
    code = (
        "import warnings, torch, normkit\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    for m, s in [(normkit.RMSNorm(64), (4, 64)), (normkit.LayerNorm2d(8), (2, 8, 3, 3)),\n"
        "                 (normkit.GroupNorm(8, 2), (2, 8, 3, 3)), (normkit.DyT(64), (4, 64))]:\n"
        "        for _ in range(2):\n"
        "            m(torch.randn(s)).sum().backward()\n"
        "    from normkit.backend import resolve\n"
        "    print(resolve(None, torch.empty(1 << 20), 'rms_norm', True))\n"
        "print(len([x for x in w if 'normkit' in str(x.message)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "NORMKIT_CXX")}
    env.update(PATH=str(tmp_path), NORMKIT_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["native", "1"], out.stdout
