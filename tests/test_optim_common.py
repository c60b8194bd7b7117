"""What every normkit.optim optimizer shares: half-precision parameters, closures, parameters
without gradients, sparse gradients refused by name, torch's LR schedulers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normkit.optim import AGC, LAMB, LARS, SGDP, AdamP, NovoGrad, SinkGD

MAKERS = {
    "AdamP": lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.1),
    "SGDP": lambda ps: SGDP(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "LAMB": lambda ps: LAMB(ps, lr=1e-2, weight_decay=0.1),
    "LARS": lambda ps: LARS(ps, lr=1.0, weight_decay=0.1, trust_coefficient=0.02),  # steps visible in bfloat16
    "NovoGrad": lambda ps: NovoGrad(ps, lr=0.1, weight_decay=0.1),
    "SinkGD": lambda ps: SinkGD([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "adamw"}], lr=0.1),
    "AGC": lambda ps: AGC(torch.optim.SGD(ps, lr=0.1)),
}


def _params(dtype=torch.float32):
    return [nn.Parameter(torch.randn(4, 3, dtype=dtype)), nn.Parameter(torch.randn(4, dtype=dtype))]


@pytest.mark.parametrize("name", MAKERS)
def test_bfloat16_parameters_step_in_their_dtype(name):
    ps = _params(torch.bfloat16)
    before = [p.detach().clone() for p in ps]
    opt = MAKERS[name](ps)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p, b in zip(ps, before):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p, b)


@pytest.mark.parametrize("name", MAKERS)
def test_closure_and_missing_gradients(name):
    ps = _params()
    frozen = ps[0].detach().clone()
    opt = MAKERS[name](ps)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (ps[1] ** 2).sum()  # ps[0] gets no gradient and must not move
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and ps[0].grad is None
    assert torch.equal(ps[0].detach(), frozen)


@pytest.mark.parametrize("name", [n for n in MAKERS if n != "AGC"])
def test_sparse_gradients_are_refused_by_name(name):
    ps = _params()
    opt = MAKERS[name](ps)
    ps[0].grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match=f"{name} does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", MAKERS)
def test_lr_scheduler_drives_the_groups(name):
    ps = _params()
    opt = MAKERS[name](ps)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * 0.5) for g in opt.param_groups)


@pytest.mark.parametrize("name", [n for n in MAKERS if n != "AGC"])
def test_complex_parameters_are_refused_by_name(name):
    """Adam-style moments g·g (not g·conj(g)) and the real row dot products would be silently wrong."""
    ps = [nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)), nn.Parameter(torch.randn(4, dtype=torch.complex64))]
    opt = MAKERS[name](ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match=f"{name} expects real parameters"):
        opt.step()
