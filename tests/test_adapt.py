"""TestTimeAdapter: each method's statistics against a plain re-statement, reset/episodic, copies, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normkit.adapt.tta import METHODS, TestTimeAdapter
from normkit.nn.batch_norm import BatchNorm, BatchNorm2d, BatchNorm3d
from normkit.nn.layer_norm import LayerNorm

EPS = 1e-5


def _trained_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    """Give a BN layer non-trivial 'source' statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return bn.eval()


def small_cnn(seed: int = 0, bn: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        _trained_bn(bn(4), seed),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        _trained_bn(bn(6), seed + 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    return m.eval()


def _x(*shape: int, seed: int = 1, shift: float = 0.7, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _chan(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _ref_norm(x, mean, var, w, b, eps=EPS):
    return (x - _chan(mean, x)) / torch.sqrt(_chan(var, x) + eps) * _chan(w, x) + _chan(b, x)


def _dims(x):
    return (0,) + tuple(range(2, x.dim()))


# --------------------------------------------------------------------------- statistics of each method


def test_tbn_uses_the_test_batch_statistics():
    bn = _trained_bn(nn.BatchNorm2d(4))
    x = _x(3, 4, 5, 5)
    y = TestTimeAdapter(bn, "tbn")(x)
    mean = x.mean(_dims(x))
    var = ((x - _chan(mean, x)) ** 2).mean(_dims(x))  # biased
    torch.testing.assert_close(y, _ref_norm(x, mean, var, bn.weight, bn.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_alpha_bn_mixes_test_and_source_statistics(alpha):
    bn = _trained_bn(nn.BatchNorm2d(4))
    adapter = TestTimeAdapter(bn, "alpha_bn", alpha=alpha)
    for seed in (1, 2):  # stateless: every batch mixes with the source statistics afresh
        x = _x(3, 4, 5, 5, seed=seed)
        n = x.numel() // 4
        mean_b = x.mean(_dims(x))
        var_b = ((x - _chan(mean_b, x)) ** 2).sum(_dims(x)) / (n - 1)  # unbiased, as torch's running_var
        mean = alpha * mean_b + (1 - alpha) * bn.running_mean
        var = alpha * var_b + (1 - alpha) * bn.running_var
        torch.testing.assert_close(adapter(x), _ref_norm(x, mean, var, bn.weight, bn.bias), rtol=1e-5, atol=1e-5)


def test_alpha_bn_at_one_value_per_channel_uses_zero_batch_variance():
    bn = _trained_bn(nn.BatchNorm1d(5))
    x = _x(1, 5)
    mean = 0.1 * x[0] + 0.9 * bn.running_mean
    var = 0.9 * bn.running_var  # the unbiased variance of one value is undefined: 0 is used
    torch.testing.assert_close(TestTimeAdapter(bn, "alpha_bn")(x), _ref_norm(x, mean, var, bn.weight, bn.bias))


def test_ema_bn_updates_then_normalizes_with_the_running_statistics():
    bn = _trained_bn(nn.BatchNorm2d(4))
    m = 0.2
    adapter = TestTimeAdapter(bn, "ema_bn", momentum=m)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for seed in (1, 2, 3):
        x = _x(2, 4, 3, 3, seed=seed)
        n = x.numel() // 4
        mean_b = x.mean(_dims(x))
        var_b = ((x - _chan(mean_b, x)) ** 2).sum(_dims(x)) / (n - 1)
        rm = (1 - m) * rm + m * mean_b
        rv = (1 - m) * rv + m * var_b
        torch.testing.assert_close(adapter(x), _ref_norm(x, rm, rv, bn.weight, bn.bias), rtol=1e-5, atol=1e-5)
    layer = adapter.model
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)


def test_robust_bn_follows_rotta_update():
    bn = _trained_bn(nn.BatchNorm2d(4))
    m = 0.05
    adapter = TestTimeAdapter(bn, "robust_bn")
    mu, var = bn.running_mean.clone(), bn.running_var.clone()
    for seed in (1, 2, 3):
        x = _x(2, 4, 3, 3, seed=seed)
        mean_b = x.mean(_dims(x))
        var_b = ((x - _chan(mean_b, x)) ** 2).mean(_dims(x))  # biased
        mu = (1 - m) * mu + m * mean_b
        var = (1 - m) * var + m * var_b
        torch.testing.assert_close(adapter(x), _ref_norm(x, mu, var, bn.weight, bn.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.model.running_mean, mu)


def test_robust_bn_output_has_gradient_through_batch_statistics():
    x = _x(2, 4, 3, 3).requires_grad_()
    y = TestTimeAdapter(_trained_bn(nn.BatchNorm2d(4)), "robust_bn")(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    # With frozen statistics the gradient would be w/sqrt(var+eps)·2y; with statistics in the graph it differs.
    assert torch.isfinite(g).all() and g.abs().sum() > 0


class _UnMixReference:
    """UnMix-TNS written out plainly (official ``UnMixTNS2d``): init, mixture statistics, component update."""

    def __init__(self, bn, k, gen, coeff=0.5, bs_max=64, temp=0.07):
        c = bn.num_features
        self.w, self.b = bn.weight.detach(), bn.bias.detach()
        self.mu = bn.running_mean.repeat(k, 1).clone()
        self.var = bn.running_var.repeat(k, 1).clone()
        if k > 1:
            noise = torch.randn((k, c), generator=gen)
            self.mu = self.mu + math.sqrt(coeff * k / (k - 1)) * bn.running_var.sqrt() * noise
            self.var = (1 - coeff) * self.var
        self.k, self.temp, self.bs_max, self.momentum, self.bs = k, temp, bs_max, bn.momentum, None

    def __call__(self, x):
        b, c = x.shape[:2]
        if self.bs is None:
            self.bs = b
        m_inst = x.mean((2, 3))
        v_inst = ((x - m_inst[:, :, None, None]) ** 2).mean((2, 3))
        p = torch.zeros(b, self.k)
        for i in range(b):
            for j in range(self.k):
                cos = (m_inst[i] @ self.mu[j]) / (m_inst[i].norm() * self.mu[j].norm())
                p[i, j] = cos / self.temp
        p = torch.softmax(p, 1)
        mean = torch.zeros(b, c)
        var = torch.zeros(b, c)
        sq = torch.zeros(b, c)
        for j in range(self.k):
            mj = (1 - p[:, j : j + 1]) * self.mu[j] + p[:, j : j + 1] * m_inst
            vj = (1 - p[:, j : j + 1]) * self.var[j] + p[:, j : j + 1] * v_inst
            mean += mj / self.k
            var += vj / self.k
            sq += mj**2 / self.k
        var = var + sq - mean**2
        big_m = 1 - (1 - self.momentum) ** (self.bs / self.bs_max)
        new_mu, new_var = self.mu.clone(), self.var.clone()
        for j in range(self.k):
            new_mu[j] = self.mu[j] + big_m * (p[:, j : j + 1] * (m_inst - self.mu[j])).mean(0)
            new_var[j] = self.var[j] + big_m * (p[:, j : j + 1] * (v_inst - self.var[j])).mean(0)
        self.mu, self.var = new_mu, new_var
        y = (x - mean[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + EPS)
        return y * self.w[None, :, None, None] + self.b[None, :, None, None]


@pytest.mark.parametrize("k", [1, 4])
def test_unmix_tns_matches_restatement_over_a_stream(k):
    bn = _trained_bn(nn.BatchNorm2d(5))
    adapter = TestTimeAdapter(bn, "unmix_tns", num_components=k, seed=3)
    ref = _UnMixReference(bn, k, torch.Generator().manual_seed(3))
    layer = adapter.model
    torch.testing.assert_close(layer.components_mean, ref.mu)
    torch.testing.assert_close(layer.components_var, ref.var)
    for seed, b in ((1, 4), (2, 4), (3, 2)):  # the short last batch keeps the first batch's momentum
        x = _x(b, 5, 3, 3, seed=seed)
        torch.testing.assert_close(adapter(x), ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.components_mean, ref.mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.components_var, ref.var, rtol=1e-5, atol=1e-6)


def test_unmix_tns_single_component_is_instance_norm_and_linear_features_use_source():
    bn = _trained_bn(nn.BatchNorm2d(3))
    x = _x(2, 3, 4, 4)
    mean = x.mean((2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((2, 3), keepdim=True)
    want = (x - mean) / torch.sqrt(var + EPS) * _chan(bn.weight, x) + _chan(bn.bias, x)
    torch.testing.assert_close(TestTimeAdapter(bn, "unmix_tns", num_components=1)(x), want, rtol=1e-5, atol=1e-5)
    bn1 = _trained_bn(nn.BatchNorm1d(3))
    x1 = _x(1, 3)
    with torch.no_grad():
        torch.testing.assert_close(TestTimeAdapter(bn1, "unmix_tns")(x1), bn1(x1))


def test_tent_takes_one_entropy_step_on_norm_affine_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), _trained_bn(nn.BatchNorm2d(4)), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 5),
        LayerNorm(5),
    )  # fmt: skip
    x = _x(3, 1, 5, 5)
    lr = 0.5
    adapter = TestTimeAdapter(model, "tent", optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    assert adapter.tent_parameters == ["1.weight", "1.bias", "5.weight", "5.bias"]

    # Re-statement: BN with batch statistics, mean softmax entropy, one plain SGD step on the affine.
    conv, bn, lin, ln = model[0], model[1], model[4], model[5]
    params = [p.detach().clone().requires_grad_() for p in (bn.weight, bn.bias, ln.weight, ln.bias)]
    h = conv(x)
    mean = h.mean((0, 2, 3))
    var = ((h - _chan(mean, h)) ** 2).mean((0, 2, 3))
    h = torch.relu(_ref_norm(h, mean, var, params[0], params[1])).flatten(1)
    z = lin(h)
    zm = z.mean(1, keepdim=True)
    logits = (z - zm) / torch.sqrt(((z - zm) ** 2).mean(1, keepdim=True) + EPS) * params[2] + params[3]
    p = logits.softmax(1)
    loss = -(p * p.log()).sum(1).mean()
    grads = torch.autograd.grad(loss, params)

    out = adapter(x)
    torch.testing.assert_close(out, logits.detach(), rtol=1e-5, atol=1e-5)  # the pre-step prediction
    adapted = adapter.model
    for q, p0, g in zip((adapted[1].weight, adapted[1].bias, adapted[5].weight, adapted[5].bias), params, grads):
        torch.testing.assert_close(q.detach(), p0.detach() - lr * g, rtol=1e-5, atol=1e-6)
    assert torch.equal(adapted[0].weight, conv.weight) and torch.equal(adapted[4].weight, lin.weight)


def test_tent_bn_only_leaves_layernorm_alone_and_steps_repeat():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _trained_bn(nn.BatchNorm2d(4)), nn.Flatten(), nn.Linear(36, 5), nn.LayerNorm(5))
    adapter = TestTimeAdapter(model, "tent", norms="bn", steps=3, lr=1e-2)
    assert adapter.tent_parameters == ["1.weight", "1.bias"]
    adapter(_x(4, 1, 5, 5))
    assert torch.equal(adapter.model[4].weight, model[4].weight)
    assert not torch.equal(adapter.model[1].weight, model[1].weight)
    assert adapter.optimizer.state[adapter.model[1].weight]["step"] == 3


# --------------------------------------------------------------------------- layers of every kind


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.BatchNorm1d(4), (3, 4, 6)),
        (lambda: nn.BatchNorm3d(4), (2, 4, 2, 3, 2)),
        (lambda: BatchNorm2d(4), (2, 4, 3, 3)),
        (lambda: BatchNorm3d(4), (2, 4, 2, 2, 2)),
        (lambda: BatchNorm(4), (2, 4, 5)),
        (lambda: BatchNorm(4, channels_last=True), (2, 5, 4)),
    ],
)
@pytest.mark.parametrize("method", ["tbn", "alpha_bn"])
def test_every_batchnorm_kind(make, shape, method):
    bn = _trained_bn(make())
    x = _x(*shape)
    xc = x.movedim(-1, 1) if getattr(bn, "channels_last", False) else x
    mean_b = xc.mean(_dims(xc))
    n = xc.numel() // 4
    var_b = ((xc - _chan(mean_b, xc)) ** 2).sum(_dims(xc)) / n
    if method == "alpha_bn":
        mean = 0.1 * mean_b + 0.9 * bn.running_mean
        var = 0.1 * var_b * n / (n - 1) + 0.9 * bn.running_var
    else:
        mean, var = mean_b, var_b
    want = _ref_norm(xc, mean, var, bn.weight, bn.bias)
    if getattr(bn, "channels_last", False):
        want = want.movedim(1, -1)
    torch.testing.assert_close(TestTimeAdapter(bn, method)(x), want, rtol=1e-5, atol=1e-5)


def test_half_input_keeps_dtype():
    model = small_cnn()
    for method in ("alpha_bn", "unmix_tns"):
        adapter = TestTimeAdapter(model, method)
        adapter.model.half()
        with torch.no_grad():
            y = adapter(_x(2, 1, 6, 6).half())
        assert y.dtype == torch.float16 and torch.isfinite(y).all()


# --------------------------------------------------------------------------- reset, episodic, copies


def _stream(n=3, bs=4):
    return [_x(bs, 1, 6, 6, seed=10 + i, shift=0.5 * i) for i in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_reset_restores_bit_identical_outputs(method):
    model = small_cnn()
    adapter = TestTimeAdapter(model, method)
    xs = _stream()
    first = [adapter(x) for x in xs]
    adapter.reset()
    again = [adapter(x) for x in xs]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    if method not in ("source", "tbn", "alpha_bn"):  # stateful: the stream changed the outputs
        adapter.reset()
        assert not torch.equal(adapter(xs[2]), first[2])


@pytest.mark.parametrize("method", ["ema_bn", "unmix_tns", "tent"])
def test_episodic_resets_after_every_batch(method):
    model = small_cnn()
    episodic = TestTimeAdapter(model, method, episodic=True)
    xs = _stream()
    for x in xs:
        assert torch.equal(episodic(x), TestTimeAdapter(model, method)(x))
    fresh = TestTimeAdapter(model, method).model.state_dict()
    for k, v in episodic.model.state_dict().items():
        assert torch.equal(v, fresh[k]), k


@pytest.mark.parametrize("method", METHODS)
def test_input_model_is_not_mutated_and_gradient_free_methods_run_under_no_grad(method):
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    types = [type(m) for m in model.modules()]
    adapter = TestTimeAdapter(model, method)
    with torch.no_grad():
        for x in _stream():
            y = adapter(x)
    assert y.shape == (4, 3) and torch.isfinite(y).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [type(m) for m in model.modules()] == types
    assert not model.training


def test_inplace_adapts_the_given_model():
    model = small_cnn()
    adapter = TestTimeAdapter(model, "alpha_bn", inplace=True)
    assert adapter.model is model
    assert type(model[1]).__name__ == "AlphaBatchNorm"
    assert adapter.adapted_layers == ["1", "4"]


@pytest.mark.parametrize("method", ["ema_bn", "unmix_tns"])
def test_state_dict_resumes_the_adapted_state(method):
    model = small_cnn()
    a = TestTimeAdapter(model, method)
    xs = _stream(4)
    for x in xs[:2]:
        a(x)
    b = TestTimeAdapter(model, method, **({"seed": 9} if method == "unmix_tns" else {}))
    b.load_state_dict(a.state_dict())
    for x in xs[2:]:
        assert torch.equal(a(x), b(x))


# --------------------------------------------------------------------------- batch size 1 and errors


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_one_on_conv_features(method):
    y = TestTimeAdapter(small_cnn(), method)(_x(1, 1, 6, 6))
    assert y.shape == (1, 3) and torch.isfinite(y).all()


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_one_on_linear_features(method):
    model = nn.Sequential(nn.Linear(3, 4), _trained_bn(nn.BatchNorm1d(4)), nn.ReLU(), nn.Linear(4, 2))
    adapter = TestTimeAdapter(model, method)
    if method in ("source", "alpha_bn", "unmix_tns"):
        assert torch.isfinite(adapter(_x(1, 3))).all()
    else:
        with pytest.raises(ValueError, match=r"one value per channel.*\(1, 4\).*alpha_bn"):
            adapter(_x(1, 3))
        assert torch.isfinite(adapter(_x(2, 3))).all()


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown test-time adaptation method 'bn_adapt'.*source, tbn, alpha_bn.*tent"):
        TestTimeAdapter(small_cnn(), "bn_adapt")


def test_model_without_norm_is_an_error():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no BatchNorm layer to adapt"):
        TestTimeAdapter(mlp, "tbn")
    with pytest.raises(ValueError, match="no normalization affine parameter"):
        TestTimeAdapter(mlp, "tent")
    TestTimeAdapter(mlp, "source")  # the baseline works on anything
    ln_model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert TestTimeAdapter(ln_model, "tent").tent_parameters == ["1.weight", "1.bias"]
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        TestTimeAdapter(ln_model, "alpha_bn")


def test_bad_options_are_errors():
    model = small_cnn()
    with pytest.raises(TypeError, match=r"unexpected option\(s\) momentum; its options: alpha"):
        TestTimeAdapter(model, "alpha_bn", momentum=0.1)
    with pytest.raises(ValueError, match="alpha must be in"):
        TestTimeAdapter(model, "alpha_bn", alpha=1.5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TestTimeAdapter(model, "tent", steps=0)
    with pytest.raises(ValueError, match="optimizer must be"):
        TestTimeAdapter(model, "tent", optimizer="lbfgs")
    with pytest.raises(ValueError, match="num_components"):
        TestTimeAdapter(model, "unmix_tns", num_components=0)
    no_stats = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="has none .track_running_stats=False.*tbn"):
        TestTimeAdapter(no_stats, "ema_bn")
    assert TestTimeAdapter(no_stats, "tbn")(_x(2, 1, 4, 4)).shape == (2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"expects 4 channels"):
        TestTimeAdapter(_trained_bn(nn.BatchNorm2d(4)), "tbn")(_x(2, 2, 6, 6))
    with pytest.raises(TypeError, match="nn.Module"):
        TestTimeAdapter(lambda x: x, "tbn")
