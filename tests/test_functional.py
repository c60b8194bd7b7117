"""Each norm against its formula (tests/reference.py), on both CPU backends, plus gradcheck."""

import pytest
import reference as ref
import torch
import torch.nn.functional as TF
from conftest import BACKENDS

import normkit
from normkit import functional as F

D = torch.float64


def _p(n, dtype=D, offset=0.0):
    return (torch.randn(n, dtype=dtype) + offset).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm(backend):
    x, w, b = torch.randn(4, 3, 8, dtype=D), _p(8, offset=1), _p(8)
    torch.testing.assert_close(F.layer_norm(x, 8, w, b, 1e-5, backend=backend), ref.layer_norm(x, w, b, 1e-5))
    # several trailing dims
    x2, w2, b2 = torch.randn(4, 3, 8, dtype=D), _p(24).reshape(3, 8), _p(24).reshape(3, 8)
    torch.testing.assert_close(F.layer_norm(x2, (3, 8), w2, b2, backend=backend), ref.layer_norm(x2, w2, b2, k=2))
    # no affine and the Gemma-style offset
    torch.testing.assert_close(F.layer_norm(x, 8, backend=backend), ref.layer_norm(x))
    torch.testing.assert_close(
        F.layer_norm(x, 8, w, b, weight_offset=1.0, backend=backend), ref.layer_norm(x, 1 + w, b)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm(backend):
    x, w, b = torch.randn(5, 16, dtype=D), _p(16), _p(16)
    torch.testing.assert_close(F.rms_norm(x, 16, w, 1e-6, backend=backend), ref.rms_norm(x, w, 1e-6))
    torch.testing.assert_close(F.rms_norm(x, 16, w, 1e-6, bias=b, backend=backend), ref.rms_norm(x, w, 1e-6, b))
    torch.testing.assert_close(
        F.rms_norm(x, 16, w, 1e-6, weight_offset=1.0, backend=backend), ref.rms_norm(x, 1 + w, 1e-6)
    )
    # eps=None follows torch: finfo(dtype).eps
    xf = torch.randn(3, 16)
    torch.testing.assert_close(F.rms_norm(xf, 16, backend=backend), TF.rms_norm(xf, (16,)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_first_token_norms(backend):
    x, w, b = torch.randn(2, 6, 3, 5, dtype=D), _p(6), _p(6)
    torch.testing.assert_close(F.layer_norm2d(x, w, b, backend=backend), ref.layer_norm2d(x, w, b))
    torch.testing.assert_close(F.rms_norm2d(x, w, 1e-6, backend=backend), ref.rms_norm2d(x, w, 1e-6))
    x3 = torch.randn(2, 6, 7, dtype=D)  # any (N, C, *)
    torch.testing.assert_close(F.layer_norm2d(x3, w, b, backend=backend), ref.layer_norm2d(x3, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_and_instance_norm(backend):
    x, w, b = torch.randn(3, 8, 4, 5, dtype=D), _p(8), _p(8)
    for groups in (1, 2, 8):
        torch.testing.assert_close(F.group_norm(x, groups, w, b, backend=backend), ref.group_norm(x, groups, w, b))
    torch.testing.assert_close(F.instance_norm(x, weight=w, bias=b, backend=backend), ref.instance_norm(x, w, b))
    x1 = torch.randn(3, 8, 11, dtype=D)
    torch.testing.assert_close(F.instance_norm(x1, backend=backend), ref.instance_norm(x1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_train_eval_and_running_stats(backend):
    c = 4
    x = torch.randn(6, c, 3, 3, dtype=D)
    w, b = _p(c), _p(c)
    rm, rv = torch.zeros(c, dtype=D), torch.ones(c, dtype=D)
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
    torch.testing.assert_close(y, ref.batch_norm_train(x, w, b))
    # running update written out: r <- 0.9 r + 0.1 batch, with the unbiased variance
    dims = (0, 2, 3)
    torch.testing.assert_close(rm, 0.1 * x.mean(dims))
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var(dims, correction=1))
    ye = F.batch_norm(x, rm, rv, w, b, False, eps=1e-5, backend=backend)
    torch.testing.assert_close(ye, ref.batch_norm_eval(x, rm, rv, w, b))


def test_batch_norm_module_matches_torch_step_by_step():
    for momentum in (0.1, None):
        ours, theirs = normkit.BatchNorm2d(5, momentum=momentum).double(), torch.nn.BatchNorm2d(5, momentum=momentum).double()
        for step in range(4):
            x = torch.randn(4, 5, 3, 3, dtype=D) * (step + 1) + step
            torch.testing.assert_close(ours(x), theirs(x))
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == 4
        ours.eval()
        theirs.eval()
        x = torch.randn(2, 5, 3, 3, dtype=D)
        torch.testing.assert_close(ours(x), theirs(x))


def test_instance_norm_running_stats_match_torch():
    ours = normkit.InstanceNorm(3, affine=True, track_running_stats=True).double()
    theirs = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True).double()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=D) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_norm_and_dyt(backend):
    x = torch.randn(4, 7, dtype=D)
    g = torch.tensor(2.5, dtype=D)
    torch.testing.assert_close(F.scale_norm(x, g, backend=backend), ref.scale_norm(x, g))
    tiny = torch.zeros(1, 7, dtype=D)  # the clamp keeps zero rows finite
    assert torch.isfinite(F.scale_norm(tiny, g, backend=backend)).all()
    a, w, b = torch.tensor([0.7], dtype=D), _p(7), _p(7)
    torch.testing.assert_close(F.dyt(x, a, w, b, backend=backend), ref.dyt(x, a, w, b))
    xc = torch.randn(2, 7, 3, dtype=D)
    torch.testing.assert_close(
        F.dyt(xc, a, w, b, channels_last=False, backend=backend),
        ref.dyt(xc, a, w.reshape(1, 7, 1), b.reshape(1, 7, 1)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_add_norm(backend, norm):
    x, r, w, b = torch.randn(3, 8, dtype=D), torch.randn(3, 8, dtype=D), _p(8), _p(8)
    y, s = F.add_norm(x, r, 8, w, b, 1e-5, norm=norm, backend=backend)
    torch.testing.assert_close(s, x + r)
    want = ref.layer_norm(x + r, w, b) if norm == "layernorm" else ref.rms_norm(x + r, w, 1e-5, b)
    torch.testing.assert_close(y, want)


GRADCHECK = {
    "layer_norm": lambda x, r, w, b: F.layer_norm(x, 6, w, b),
    "layer_norm_offset": lambda x, r, w, b: F.layer_norm(x, 6, w, b, weight_offset=1.0),
    "rms_norm": lambda x, r, w, b: F.rms_norm(x, 6, w, 1e-5, bias=b),
    "add_norm_ln": lambda x, r, w, b: F.add_norm(x, r, 6, w, b, norm="layernorm"),
    "add_norm_rms": lambda x, r, w, b: F.add_norm(x, r, 6, w, None, 1e-5, norm="rmsnorm"),
    "layer_norm2d": lambda x, r, w, b: F.layer_norm2d(x.reshape(2, 6, 4), w, b),
    "rms_norm2d": lambda x, r, w, b: F.rms_norm2d(x.reshape(2, 6, 4), w, 1e-5),
    "group_norm": lambda x, r, w, b: F.group_norm(x.reshape(2, 6, 4), 3, w, b),
    "instance_norm": lambda x, r, w, b: F.instance_norm(x.reshape(2, 6, 4), weight=w, bias=b),
    "batch_norm": lambda x, r, w, b: F.batch_norm(x.reshape(2, 6, 4), None, None, w, b, True),
    "batch_norm_masked": lambda x, r, w, b: F.batch_norm(
        x.reshape(2, 6, 4), None, None, w, b, True, mask=torch.tensor([[[1, 1, 0, 1]], [[0, 1, 1, 1]]]).bool()
    ),
    "layer_norm_masked": lambda x, r, w, b: F.layer_norm(
        x, 6, w, b, mask=torch.tensor([1, 1, 0, 1, 1, 0]).bool()
    ),
    "scale_norm": lambda x, r, w, b: F.scale_norm(x, w[:1]),
    "dyt": lambda x, r, w, b: F.dyt(x, w[:1], w, b),
}


def _gradcheck_inputs():
    x = torch.randn(8, 6, dtype=D, requires_grad=True)
    r = torch.randn(8, 6, dtype=D, requires_grad=True)
    w = (torch.rand(6, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=D, requires_grad=True)
    return x, r, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck_float64(name, backend):
    with normkit.set_backend(backend):
        assert torch.autograd.gradcheck(GRADCHECK[name], _gradcheck_inputs(), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(n for n in GRADCHECK if not n.startswith("add_norm")))
def test_gradgradcheck_float64(name, backend):
    # second derivatives (gradient penalties through a norm): the backward with create_graph=True
    # must see the statistics' dependence on x, which the closed-form first backward treats as constant
    with normkit.set_backend(backend):
        assert torch.autograd.gradgradcheck(GRADCHECK[name], _gradcheck_inputs(), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_double_backward_is_a_clear_error(backend):
    x, r = torch.randn(3, 6, dtype=D, requires_grad=True), torch.randn(3, 6, dtype=D, requires_grad=True)
    y, s = F.add_norm(x, r, 6, backend=backend)
    with pytest.raises(RuntimeError, match="add_norm does not support double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
