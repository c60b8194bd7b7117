"""normkit's Triton kernels on a GPU: the same comparisons as ``tests/test_triton.py`` on CUDA tensors,
in float32 and bfloat16, plus determinism and ``torch.compile``. Skipped without CUDA (CI); run by
``scripts/gpu_check.sh`` in its own process (``test_triton.py`` imports triton for the interpreter,
which rules out compiled kernels in the same process).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import normkit  # noqa: E402
import normkit.functional as F  # noqa: E402
from normkit import backend as B  # noqa: E402
from normkit.kernels.triton import launch  # noqa: E402

if launch.imported_for_interpreter():
    pytest.skip("triton was imported for the interpreter in this process; run this file alone", allow_module_level=True)

CUDA = "cuda"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def ref_norm(x, w, b, eps, center=True, dims=(-1,)):
    """The norm's formula in float64: (x − mean)/sqrt(var + eps)·w + b (RMS: mean = 0)."""
    x = x.double()
    mean = x.mean(dims, keepdim=True) if center else 0.0
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * (1 if w is None else w.double()) + (0 if b is None else b.double())


def _grads(f, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = f(*leaves)
    return y, torch.autograd.grad(y, leaves, g.to(y.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 3, 127, 1000, 4097, 32768, 70000])
@pytest.mark.parametrize("center", [True, False])
def test_rows(dtype, width, center):
    x = torch.randn(64, width, device=CUDA, dtype=dtype) * 2 + 1
    w = torch.randn(width, device=CUDA, dtype=dtype)
    b = torch.randn(width, device=CUDA, dtype=dtype)
    g = torch.randn(64, width, device=CUDA)
    eps = 1e-5
    f = (lambda x, w, b: F.layer_norm(x, width, w, b, eps, backend="triton")) if center else \
        (lambda x, w, b: F.rms_norm(x, width, w, eps, bias=b, backend="triton"))
    y, grads = _grads(f, (x, w, b), g)
    ref, rgrads = _grads(lambda x, w, b: ref_norm(x, w, b, eps, center), (x.double(), w.double(), b.double()), g)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=tol * 4, rtol=tol)
    for a, r in zip(grads, rgrads):  # ∂w sums over 64 rows: scale the tolerance with the magnitude
        torch.testing.assert_close(a.double(), r, atol=tol * 8 * (1 + r.abs().max().item()), rtol=tol * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_image_norms_dyt(dtype):
    tol = TOL[dtype]
    x, r = torch.randn(32, 512, device=CUDA, dtype=dtype), torch.randn(32, 512, device=CUDA, dtype=dtype)
    w = torch.randn(512, device=CUDA, dtype=dtype)
    y, s = F.add_norm(x, r, 512, w, None, 1e-6, norm="rmsnorm", backend="triton")
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y.double(), ref_norm(x + r, w, None, 1e-6, False), atol=tol * 4, rtol=tol)
    img = torch.randn(4, 96, 14, 14, device=CUDA, dtype=dtype)
    wc, bc = torch.randn(96, device=CUDA, dtype=dtype), torch.randn(96, device=CUDA, dtype=dtype)
    y = F.layer_norm2d(img, wc, bc, 1e-6, backend="triton")
    ref = ref_norm(img.movedim(1, -1), wc, bc, 1e-6).movedim(-1, 1)
    torch.testing.assert_close(y.double(), ref, atol=tol * 4, rtol=tol)
    y = F.group_norm(img, 32, wc, bc, backend="triton")
    n = img.shape[0]
    ref = ref_norm(img.reshape(n, 32, -1), None, None, 1e-5, dims=(-1,)).reshape(img.shape)
    ref = ref * wc.double().reshape(1, -1, 1, 1) + bc.double().reshape(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), ref, atol=tol * 4, rtol=tol)
    m = normkit.DyT(96, channels_last=False, backend="triton").to(CUDA, dtype)
    ref = torch.tanh(m.alpha.double() * img.double()) * m.weight.double().reshape(-1, 1, 1) + m.bias.double().reshape(-1, 1, 1)
    torch.testing.assert_close(m(img).double(), ref, atol=tol * 4, rtol=tol)


def test_bitwise_reproducible_weight_grads():
    x = torch.randn(4096, 1024, device=CUDA, dtype=torch.bfloat16)
    w = torch.randn(1024, device=CUDA, requires_grad=True)
    g = torch.randn_like(x)
    runs = [torch.autograd.grad(F.rms_norm(x, 1024, w, 1e-6, backend="triton"), w, g)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_compile_fullgraph_keeps_the_kernels():
    torch._dynamo.reset()
    m = normkit.LayerNorm(256, backend="triton").to(CUDA)
    x = torch.randn(8, 256, device=CUDA, requires_grad=True)
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (256,), m.weight, m.bias))
    y.sum().backward()
    assert x.grad is not None


def test_auto_stays_on_aten():
    x = torch.randn(8, 256, device=CUDA)
    with B.record() as calls:
        normkit.LayerNorm(256).to(CUDA)(x)
    assert calls[0] == ("layer_norm", "native")
