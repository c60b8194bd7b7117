"""Backend dispatch: selection, scoping, agreement, no surprise compiles, low precision."""

import pytest
import torch
import torch.nn.functional as TF

import normkit
from normkit import backend as B
from normkit import functional as F


def test_set_backend_is_global_and_a_context_manager():
    assert normkit.get_backend() == "auto"
    with normkit.set_backend("eager"):
        assert normkit.get_backend() == "eager"
        with normkit.set_backend("compiled"):
            assert normkit.get_backend() == "compiled"
        assert normkit.get_backend() == "eager"
    assert normkit.get_backend() == "auto"
    normkit.set_backend("compiled")
    assert normkit.get_backend() == "compiled"
    normkit.set_backend("auto")


def test_auto_never_compiles(monkeypatch):
    # "auto" may use ATen's ops and normkit's prebuilt C++ kernels, but never starts torch.compile
    def boom(*a, **k):
        raise AssertionError("auto backend started a compile")

    monkeypatch.setattr(B, "compiled", boom)
    monkeypatch.setattr(torch, "compile", boom)
    x = torch.randn(4, 8, requires_grad=True)
    for name in normkit.list_norms():
        m = normkit.registry.sample_norm(name, 8)
        inp = x if normkit.norm_info(name).layout == "channels_last" else x.reshape(2, 8, 2)
        m(inp, **normkit.registry.sample_inputs(name, inp)).sum().backward()


def test_per_layer_backend_overrides_global(monkeypatch):
    calls = []
    real = B.compiled
    monkeypatch.setattr(B, "compiled", lambda fn, key=None: (calls.append(fn.__name__), real(fn, key))[1])
    m = normkit.LayerNorm(8, backend="inductor")
    with normkit.set_backend("eager"):
        m(torch.randn(3, 8))
    assert calls == ["_forward_math"]


def test_eager_and_compiled_agree():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    outs = []
    for be in ("eager", "compiled"):
        y = F.rms_norm(x, 32, w, 1e-6, backend=be)
        outs.append((y, *torch.autograd.grad(y.sin().sum(), (x, w))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, 64, w, b), lambda x, w, b: TF.layer_norm(x, (64,), w, b), (32, 64)),
    "rms_norm": (lambda x, w, b: F.rms_norm(x, 64, w, 1e-6), lambda x, w, b: TF.rms_norm(x, (64,), w, 1e-6), (32, 64)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 8, w, b), lambda x, w, b: TF.group_norm(x, 8, w, b), (4, 64, 5, 5)),
    "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                   lambda x, w, b: TF.batch_norm(x, None, None, w, b, True), (4, 64, 5, 5)),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
                      lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), (4, 64, 5, 5)),
}


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_low_precision_error_within_twice_torchs(name, dtype, atol, backend):
    ours, theirs, shape = CASES[name]
    x = torch.randn(shape) * 3 + 1
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    ref = theirs(x, w, b)  # fp32 reference
    lp = [t.to(dtype) for t in (x, w, b)]
    torch_err = (theirs(*lp).float() - ref).abs().max().item()
    our_err = (ours(*lp).float() - ref).abs().max().item() if backend == "eager" else None
    if backend == "compiled":
        with normkit.set_backend("compiled"):
            our_err = (ours(*lp).float() - ref).abs().max().item()
    assert our_err <= 2 * torch_err + atol, (our_err, torch_err)


def test_compiled_dyt_tanh_is_accurate_and_saturates():
    x = torch.cat([torch.linspace(-60, 60, 4001), torch.tensor([0.0, 1e-8, -1e-8, 1e30, -1e30])]).reshape(-1, 1)
    alpha, w, b = torch.tensor(0.7), torch.ones(1), torch.zeros(1)
    with normkit.set_backend("compiled"):
        y = F.dyt(x, alpha, w, b)
    assert torch.isfinite(y).all()
    assert (y - torch.tanh(alpha * x)).abs().max() <= 2.5e-7


def test_compiled_dyt_backward_matches_closed_form_at_saturation():
    # the compiled backward evaluates tanh twice, in two forms (see kernels.pointwise._sech2 and _tanh);
    # its fp32 error against the float64 closed form stays within 2x that of eager (ATen's tanh) + atol
    x = torch.cat([torch.linspace(-60, 60, 4000), torch.tensor([0.0, 1e-8, -1e-8, 1e30, -1e30, 3.0, -3.0, 0.5])])
    x = x.reshape(-1, 8).requires_grad_()
    alpha = torch.tensor([0.7], requires_grad=True)
    w = torch.linspace(0.5, 2.0, 8).requires_grad_()
    b = torch.zeros(8, requires_grad=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    grads = {be: torch.autograd.grad(F.dyt(x, alpha, w, b, backend=be), [x, alpha, w, b], g) for be in ("eager", "compiled")}
    # closed form in float64: t = tanh(αx); ∂x = α·w·(1 − t²)·g, ∂α = Σ w(1 − t²)·x·g, ∂w = Σ_rows g·t, ∂b = Σ_rows g
    xd, ad, wd, gd = x.detach().double(), alpha.detach().double(), w.detach().double(), g.double()
    t = torch.tanh(ad * xd)
    ref = (ad * wd * (1 - t * t) * gd, (wd * (1 - t * t) * xd * gd).sum().reshape(1), (gd * t).sum(0), gd.sum(0))
    for name, e, c, r in zip(("dx", "dalpha", "dw", "db"), grads["eager"], grads["compiled"], ref):
        assert torch.isfinite(c).all(), name
        err_e = (e.double() - r).abs().max().item()
        err_c = (c.double() - r).abs().max().item()
        assert err_c <= 2 * err_e + 1e-6 * max(1.0, r.abs().max().item()), (name, err_c, err_e)


def test_compiled_layer_norm_handles_values_whose_squares_sum_past_float32():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    x[2] *= 1e19
    with normkit.set_backend("eager"):
        ref = F.layer_norm(x, 8)
    with normkit.set_backend("compiled"):
        out = F.layer_norm(x, 8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_compiled_normalize_with_half_stats_dtype_matches_eager():
    # a float16 stats_dtype keeps var_mean under compile (summing 2e4-sized values in fp16 overflows)
    from normkit.kernels import normalize

    x = (torch.randn(4, 1, 8, 1, generator=torch.Generator().manual_seed(0)) * 100 + 2e4).half()
    ref = normalize(x, None, None, (2,), stats_dtype=torch.float16, backend="eager")[0]
    out = normalize(x, None, None, (2,), stats_dtype=torch.float16, backend="compiled")[0]
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
