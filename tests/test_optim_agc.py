"""AGC against its formula written plainly (unit by unit, with loops), the wrapper, the NFNets groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normkit.optim import AGC, adaptive_clip_grad_, nfnet_param_groups, unitwise_norm


def agc_reference(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """NFNets' SGD_AGC.update_param, one unit (output row; whole tensor for vectors) at a time."""
    out = g.clone()
    units = [(...,)] if w.dim() <= 1 else [(i,) for i in range(w.shape[0])]
    for u in units:
        w_norm = max(math.sqrt(float((w[u] ** 2).sum())), eps)
        g_norm = math.sqrt(float((g[u] ** 2).sum()))
        if g_norm > clipping * w_norm:
            out[u] = g[u] * (clipping * w_norm / max(g_norm, 1e-6))
    return out


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 4), (7,), (), (4, 2, 3)])
def test_clip_matches_formula(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    # gradient rows of very different sizes so that some units are clipped and some are not
    scale = torch.logspace(-4, 1, w.shape[0], dtype=torch.float64).view([-1] + [1] * (w.dim() - 1)) if w.dim() else 1.0
    g = torch.randn(shape, dtype=torch.float64) * scale
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    adaptive_clip_grad_([p], clipping=0.01, eps=1e-3)
    expected = agc_reference(w, g, 0.01, 1e-3)
    torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
    if w.dim() >= 2:  # both branches were taken
        clipped = ~torch.isclose(p.grad, g).reshape(w.shape[0], -1).all(dim=1)
        assert clipped.any() and not clipped.all()


def test_zero_weight_uses_eps_and_tiny_gradient_guard():
    p = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    g = torch.full((3, 4), 1.0, dtype=torch.float64)
    p.grad = g.clone()
    adaptive_clip_grad_(p, clipping=0.1, eps=1e-3)
    torch.testing.assert_close(unitwise_norm(p.grad).flatten(), torch.full((3,), 1e-4, dtype=torch.float64))
    torch.testing.assert_close(p.grad, agc_reference(p.detach(), g, 0.1, 1e-3))


@pytest.mark.parametrize("shape", [(5, 1), (5, 1, 1, 1), (1, 5)])
def test_single_column_weights_are_one_unit_as_in_the_official_code(shape):
    """The official unitwise_norm squeezes first: a (n, 1) Linear(1, n) weight is a vector (one whole-tensor
    norm), not n one-element units (which would clip every element to λ·max(|w_i|, eps))."""
    w = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0], dtype=torch.float64).reshape(shape)
    g = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64).reshape(shape)
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    adaptive_clip_grad_(p, clipping=0.1, eps=1e-3)
    # one unit: ‖W‖ = 5, max norm 0.5 < ‖G‖ = 1, so G is scaled by 0.5 as a whole
    torch.testing.assert_close(p.grad, g * 0.5, rtol=1e-12, atol=0)


def test_unitwise_norm_shapes():
    assert unitwise_norm(torch.ones(4, 3, 2, 2)).shape == (4, 1, 1, 1)
    assert unitwise_norm(torch.ones(5, 3)).shape == (5, 1)
    torch.testing.assert_close(unitwise_norm(torch.ones(9)), torch.tensor(3.0))


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2))


def test_wrapper_clips_then_steps_and_honours_groups():
    torch.manual_seed(0)
    model = _net()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6)
    groups = nfnet_param_groups(model, weight_decay=1e-3, clipping=0.01)
    opt = AGC(torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True))
    opt_ref = torch.optim.SGD(nfnet_param_groups(ref, weight_decay=1e-3, clipping=0.01), lr=0.1, momentum=0.9, nesterov=True)
    def closure() -> float:
        opt.zero_grad()
        loss = (model(x) ** 2).mean() * 100  # large gradients: AGC clips most units
        loss.backward()
        return loss.item()

    for _ in range(3):
        assert isinstance(opt.step(closure), float)
        opt_ref.zero_grad()
        (ref(x) ** 2).mean().mul(100).backward()
        for p in ref.parameters():
            group = next(g for g in opt_ref.param_groups if any(q is p for q in g["params"]))
            if group["clipping"] is not None:
                p.grad.copy_(agc_reference(p.detach(), p.grad, group["clipping"], 1e-3))
        opt_ref.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_wrapper_shares_state_schedulers_and_state_dict():
    torch.manual_seed(0)
    model = _net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = AGC(inner, clipping=0.05, exclude=[model[5].weight])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        g_excluded = model[5].weight.grad.clone()
        opt.step()
        sched.step()
        assert torch.equal(model[5].weight.grad, g_excluded)  # excluded: never clipped
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.state is inner.state and len(inner.state) == len(list(model.parameters()))
    saved = copy.deepcopy(opt.state_dict())
    opt2 = AGC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt2.load_state_dict(saved)
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.param_groups[0]["lr"] == pytest.approx(0.025)
    for p in model.parameters():
        torch.testing.assert_close(opt2.state[p]["momentum_buffer"], inner.state[p]["momentum_buffer"])


def test_nfnet_groups_rule():
    from normkit.models.nf_resnet import NFResNet

    model = NFResNet(num_classes=3, depths=(1,), widths=(16,), stem_width=8, stochdepth_rate=0.0)
    groups = nfnet_param_groups(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(head.weight)]["clipping"] is None and by_id[id(head.weight)]["weight_decay"] == 2e-5
    assert by_id[id(head.bias)]["clipping"] is None and by_id[id(head.bias)]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        if p is head.weight or p is head.bias:
            continue
        assert by_id[id(p)]["clipping"] == 0.01, name
        no_decay = "gain" in name.rsplit(".", 1)[-1] or "bias" in name or p.dim() <= 1
        assert by_id[id(p)]["weight_decay"] == (0.0 if no_decay else 2e-5), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="classifier names"):
        nfnet_param_groups(model, classifier=["nope"])


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="clipping"):
        adaptive_clip_grad_([p], clipping=-0.1)
    with pytest.raises(ValueError, match="eps"):
        AGC(torch.optim.SGD([p], lr=0.1), eps=-1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AGC([p])
    with pytest.raises(TypeError, match="nn.Module"):
        nfnet_param_groups([p])


def test_wrapper_deepcopies_with_its_optimizer():
    model = _net()
    opt = AGC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clipping=0.02)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.clipping == 0.02 and clone.param_groups is clone.optimizer.param_groups
    assert clone.state is clone.optimizer.state and len(clone.state) == len(opt.state)
