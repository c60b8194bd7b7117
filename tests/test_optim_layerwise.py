"""LAMB, LARS and NovoGrad against their update rules written plainly here (several steps, weight
decay on and off, the trust ratio on and off and at its zero-norm edge), state dicts, bad arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normkit.optim import LAMB, LARS, NovoGrad, bias_and_norm_groups


def _grads(shape, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _run(opt_cls, w0, grads, **kw):
    p = nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def lamb_reference(w, grads, lr, betas, eps, weight_decay, trust_ratio=True, bias_correction=True):
    b1, b2 = betas
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        u = mh / (torch.sqrt(vh) + eps) + weight_decay * w
        ratio = 1.0
        if trust_ratio:
            wn, un = math.sqrt(float((w * w).sum())), math.sqrt(float((u * u).sum()))
            ratio = wn / un if wn > 0 and un > 0 else 1.0
        w = w - lr * ratio * u
    return w


def lars_reference(w, grads, lr, momentum, weight_decay, trust_coefficient, eps=0.0, trust_ratio=True):
    v = 0.0
    for g in grads:
        wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
        local = trust_coefficient * wn / (gn + weight_decay * wn + eps) if (trust_ratio and wn > 0 and gn > 0) else 1.0
        v = momentum * v + lr * local * (g + weight_decay * w)
        w = w - v
    return w


def novograd_reference(w, grads, lr, betas, eps, weight_decay, grad_averaging=False):
    b1, b2 = betas
    m, v = 0.0, 0.0
    for g in grads:
        n2 = float((g * g).sum())
        v = n2 if v == 0 else b2 * v + (1 - b2) * n2
        d = g / math.sqrt(v + eps) + weight_decay * w
        if grad_averaging:
            d = (1 - b1) * d
        m = b1 * m + d
        w = w - lr * m
    return w


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("trust_ratio", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_matches_rule(weight_decay, trust_ratio, bias_correction):
    w0 = torch.randn(4, 5, dtype=torch.float64)
    grads = _grads(w0.shape, 4)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    expected = lamb_reference(w0, grads, trust_ratio=trust_ratio, bias_correction=bias_correction, **kw)
    got = _run(LAMB, w0, grads, trust_ratio=trust_ratio, bias_correction=bias_correction, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_lamb_trust_ratio_is_one_for_a_zero_weight():
    w0 = torch.zeros(3, 3, dtype=torch.float64)
    grads = _grads(w0.shape, 2)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    torch.testing.assert_close(_run(LAMB, w0, grads, **kw), lamb_reference(w0, grads, **kw))
    assert _run(LAMB, w0, grads, **kw).abs().sum() > 0  # a zero weight still moves


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_step_is_a_fixed_fraction_of_the_weight_norm(foreach):
    """With the trust ratio, one step moves the layer by exactly lr·‖w‖, whatever the gradient scale."""
    w0 = torch.randn(6, 4, dtype=torch.float64) * 7.0
    got = _run(LAMB, w0, [torch.randn(6, 4, dtype=torch.float64) * 1e-3], lr=0.01, foreach=foreach)
    torch.testing.assert_close((got - w0).norm(), 0.01 * w0.norm(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("trust_ratio", [True, False])
def test_lars_matches_rule(weight_decay, trust_ratio):
    w0 = torch.randn(3, 2, 2, dtype=torch.float64)
    grads = _grads(w0.shape, 4)
    kw = dict(lr=0.5, momentum=0.9, weight_decay=weight_decay, trust_coefficient=1e-3)
    got = _run(LARS, w0, grads, trust_ratio=trust_ratio, **kw)
    torch.testing.assert_close(got, lars_reference(w0, grads, trust_ratio=trust_ratio, **kw), rtol=1e-10, atol=1e-12)


def test_lars_eps_and_zero_gradient():
    w0 = torch.randn(3, 3, dtype=torch.float64)
    grads = [torch.zeros(3, 3, dtype=torch.float64)] + _grads(w0.shape, 2)
    kw = dict(lr=0.1, momentum=0.5, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-3)
    torch.testing.assert_close(_run(LARS, w0, grads, **kw), lars_reference(w0, grads, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("grad_averaging", [False, True])
def test_novograd_matches_rule(weight_decay, grad_averaging):
    w0 = torch.randn(5, 3, dtype=torch.float64)
    grads = _grads(w0.shape, 4)
    kw = dict(lr=0.05, betas=(0.95, 0.98), eps=1e-8, weight_decay=weight_decay)
    got = _run(NovoGrad, w0, grads, grad_averaging=grad_averaging, **kw)
    torch.testing.assert_close(got, novograd_reference(w0, grads, grad_averaging=grad_averaging, **kw), rtol=1e-6, atol=1e-9)


def test_novograd_second_moment_starts_at_first_nonzero_gradient():
    """The official code initialises v with ‖g‖² while v is still 0, so zero gradients first do not dilute it."""
    w0 = torch.randn(4, dtype=torch.float64)
    grads = [torch.zeros(4, dtype=torch.float64)] + _grads(w0.shape, 3)
    kw = dict(lr=0.05, betas=(0.95, 0.5), eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(_run(NovoGrad, w0, grads, **kw), novograd_reference(w0, grads, **kw), rtol=1e-6, atol=1e-9)


def _model():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_bias_and_norm_groups_split():
    model = _model()
    groups = bias_and_norm_groups(model, weight_decay=0.01)
    assert groups[0]["params"] == [model[0].weight, model[3].weight] and groups[0]["weight_decay"] == 0.01
    assert groups[1]["params"] == [model[0].bias, model[1].weight, model[1].bias, model[3].bias]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["trust_ratio"] is False
    with pytest.raises(TypeError, match="nn.Module"):
        bias_and_norm_groups([model[0].weight])


@pytest.mark.parametrize(
    "make",
    [
        lambda m: LAMB(bias_and_norm_groups(m, weight_decay=0.01), lr=1e-2),
        lambda m: LARS(bias_and_norm_groups(m, weight_decay=1e-4), lr=0.5),
        lambda m: NovoGrad(m.parameters(), lr=1e-2, weight_decay=1e-3),
    ],
    ids=["LAMB", "LARS", "NovoGrad"],
)
def test_state_dict_round_trip(make):
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    opt = make(model)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3)
    model2 = _model()
    model2.load_state_dict(saved_model)
    opt2 = make(model2)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (LAMB, dict(lr=-1.0), "learning rate"),
        (LAMB, dict(betas=(0.9, 1.0)), "beta"),
        (LAMB, dict(eps=-1.0), "eps"),
        (LAMB, dict(weight_decay=-0.1), "weight_decay"),
        (LARS, dict(lr=-0.1), "learning rate"),
        (LARS, dict(lr=0.1, momentum=-0.1), "momentum"),
        (LARS, dict(lr=0.1, trust_coefficient=-1.0), "trust_coefficient"),
        (LARS, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (NovoGrad, dict(lr=-0.1), "learning rate"),
        (NovoGrad, dict(lr=0.1, betas=(-0.1, 0.9)), "beta"),
        (NovoGrad, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_novograd_beta2_zero_is_the_official_graph_behaviour():
    """The official TF1 code never writes its moment back, so each step uses v = ‖g‖²: betas=(β1, 0)."""
    w0 = torch.randn(4, 3, dtype=torch.float64)
    grads = _grads(w0.shape, 3)
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        m = 0.95 * m + g / math.sqrt(float((g * g).sum()) + 1e-8)
        w = w - 0.05 * m
    got = _run(NovoGrad, w0, grads, lr=0.05, betas=(0.95, 0.0), eps=1e-8)
    torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-9)
