"""Modules: registry construction, torch state-dict interop, torch.compile, saved activations."""

import functools
import subprocess
import sys

import pytest
import torch

import normkit
from normkit.registry import list_norms, norm_info, sample_inputs, sample_norm

TOKEN_SHAPE = (2, 5, 8)
IMAGE_SHAPE = (4, 8, 3, 3)


def _input(name):
    shape = TOKEN_SHAPE if norm_info(name).layout == "channels_last" else IMAGE_SHAPE
    return torch.randn(shape)


def _build(name, c=8):
    return sample_norm(name, c)


def _call(name, m, x):
    return m(x, **sample_inputs(name, x))


@pytest.mark.parametrize("name", list_norms())
def test_every_norm_builds_by_name_and_preserves_shape(name):
    m = _build(name)
    x = _input(name)
    for mode in (True, False):
        m.train(mode)
        y = _call(name, m, x)
        assert y.dtype == x.dtype and torch.isfinite(y).all()
        if norm_info(name).drop_in:
            assert y.shape == x.shape
    # timm's norm_layer(C) convention
    info = norm_info(name)
    layer = functools.partial(type(m), **(info.sample_kwargs(8) if info.sample_kwargs else {}))
    assert type(layer(8)) is type(m)


def test_sample_helpers_and_declared_inputs():
    assert normkit.registry.sample_norm("groupnorm", 8).num_groups == 8
    assert sample_inputs("layernorm", torch.randn(2, 3)) == {}
    for name in list_norms():
        info = norm_info(name)
        assert set(sample_inputs(name, _input(name))) == set(info.extra_inputs)
        if info.extra_inputs:
            assert not info.drop_in, f"{name} needs {info.extra_inputs}, so it is not a drop-in norm"
    meta = dict(family="f", paper=None, layout="channels_last", batch_dependent=False, train_eval_differ=False, description="d")
    with pytest.raises(ValueError, match="sample_inputs"):
        normkit.register_norm("x", **meta, drop_in=False, extra_inputs=("cond",))(torch.nn.Identity)
    with pytest.raises(ValueError, match="drop_in"):
        normkit.register_norm("x", **meta, extra_inputs=("cond",), sample_inputs=lambda x: {"cond": x})(torch.nn.Identity)
    assert "x" not in list_norms()


def test_import_normkit_registers_every_method_module():
    # A module under normkit.nn / normkit.continual that registers a norm but is not imported by
    # `import normkit` would be invisible to users (and to every test iterating list_norms()).
    code = (
        "import importlib, pkgutil, normkit, normkit.nn, normkit.continual\n"
        "before = normkit.list_norms()\n"
        "for pkg in (normkit.nn, normkit.continual):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "print(sorted(set(normkit.list_norms()) - set(before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"registered only after importing their module directly: {out}"


def test_registry_metadata_and_errors():
    names = list_norms()
    for required in ["layernorm", "rmsnorm", "layernorm2d", "rmsnorm2d", "groupnorm", "instancenorm",
                     "batchnorm", "scalenorm", "dyt"]:
        assert required in names
    for name in names:
        info = norm_info(name)
        assert info.paper.arxiv and info.paper.year >= 2015 and info.description
        assert info.layout in ("channels_last", "channels_first")
    assert norm_info("batchnorm").batch_dependent and norm_info("batchnorm").train_eval_differ
    assert not norm_info("layernorm").batch_dependent
    assert norm_info("BN").name == "batchnorm"
    assert normkit.registry.norm_info_of(normkit.BatchNorm2d(3)).name == "batchnorm"  # alias class
    assert normkit.registry.norm_info_of(normkit.GhostBatchNorm).name == "ghostbn"  # nearest registered class
    assert normkit.registry.norm_info_of(torch.nn.Conv2d(1, 1, 1)) is None
    assert normkit.registry.norm_info_of(torch.nn.BatchNorm2d(3)) is None  # torch's own: not registered
    assert type(normkit.create_norm("batchnorm2d", 3)) is normkit.BatchNorm2d
    with pytest.raises(ValueError, match="valid names: .*layernorm"):
        normkit.create_norm("no-such-norm", 3)


TORCH_PAIRS = [
    (lambda: normkit.LayerNorm(8), lambda: torch.nn.LayerNorm(8), TOKEN_SHAPE),
    (lambda: normkit.LayerNorm(8, bias=False), lambda: torch.nn.LayerNorm(8, bias=False), TOKEN_SHAPE),
    (lambda: normkit.RMSNorm(8, eps=1e-6), lambda: torch.nn.RMSNorm(8, eps=1e-6), TOKEN_SHAPE),
    (lambda: normkit.GroupNorm(8, 4), lambda: torch.nn.GroupNorm(4, 8), IMAGE_SHAPE),
    (lambda: normkit.BatchNorm2d(8), lambda: torch.nn.BatchNorm2d(8), IMAGE_SHAPE),
    (lambda: normkit.BatchNorm1d(8), lambda: torch.nn.BatchNorm1d(8), (4, 8, 5)),
    (lambda: normkit.BatchNorm3d(8), lambda: torch.nn.BatchNorm3d(8), (2, 8, 2, 2, 2)),
    (lambda: normkit.InstanceNorm(8, affine=True, track_running_stats=True),
     lambda: torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True), IMAGE_SHAPE),
]


@pytest.mark.parametrize("i", range(len(TORCH_PAIRS)))
def test_state_dict_interop_both_ways(i):
    make_ours, make_torch, shape = TORCH_PAIRS[i]
    ours, theirs = make_ours(), make_torch()
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
        for b in theirs.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(shape)
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x))
    back = make_torch()
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)


def test_layernorm2d_state_dict_is_layernorms():
    ln2d = normkit.LayerNorm2d(8)
    ln = torch.nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_()
        ln.bias.uniform_()
    ln2d.load_state_dict(ln.state_dict())
    x = torch.randn(IMAGE_SHAPE)
    torch.testing.assert_close(ln2d(x), ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_weight_offset_initialises_unit_scale():
    m = normkit.RMSNorm(8, weight_offset=1.0)
    assert torch.all(m.weight == 0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), normkit.RMSNorm(8)(x))
    assert "weight_offset=1.0" in repr(m)


@pytest.mark.parametrize("name", list_norms())
def test_torch_compile_fullgraph_train_and_eval(name):
    torch._dynamo.reset()
    m = _build(name)
    x = _input(name).requires_grad_()
    ref = _build(name)
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, fullgraph=True)
    for mode in (True, False):
        m.train(mode)
        ref.train(mode)
        extra = sample_inputs(name, x)
        y, y_ref = cm(x, **extra), ref(x, **extra)
        torch.testing.assert_close(y, y_ref)
        if mode:
            (g,) = torch.autograd.grad(y.square().sum(), x)
            (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


#: The foundation's fused norms, whose kernels promise to save only the input plus per-row
#: statistics. Methods from the literature compose autograd ops and may save more.
FUSED = ["layernorm", "rmsnorm", "layernorm2d", "rmsnorm2d", "groupnorm", "instancenorm", "batchnorm", "scalenorm", "dyt"]


@pytest.mark.parametrize("backend", ["eager", "compiled", "inductor"])
@pytest.mark.parametrize("name", FUSED)
def test_saved_activations_at_most_input_plus_rows(name, backend):
    m = _build(name, 16) if norm_info(name).layout == "channels_last" else _build(name)
    x = torch.randn(64, 7, 16) if norm_info(name).layout == "channels_last" else torch.randn(8, 8, 6, 6)
    x.requires_grad_()
    with normkit.set_backend(backend):
        saved = _saved_bytes(lambda: _call(name, m, x))
    rows = x.numel() // x.shape[-1] if norm_info(name).layout == "channels_last" else x.shape[0] * x.shape[2] * x.shape[3]
    param_bytes = sum(p.numel() * 4 for p in m.parameters())
    assert saved <= x.numel() * 4 + 2 * rows * 4 + param_bytes, (saved, x.numel() * 4)


def test_add_norm_module_method():
    m = normkit.RMSNorm(8, eps=1e-6)
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    y, s = m.forward_add(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, m(x + r))


def test_batchnorm_channels_last_is_bn_over_all_tokens():
    ours, ref = normkit.BatchNorm(8, channels_last=True), torch.nn.BatchNorm1d(8)
    x = torch.randn(4, 5, 8) * 2 + 1
    for mode in (True, False):
        ours.train(mode)
        ref.train(mode)
        torch.testing.assert_close(ours(x), ref(x.reshape(-1, 8)).reshape(x.shape))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(ValueError, match=r"\(N, \*, 8\)"):
        ours(torch.randn(4, 8, 5))
