"""SinkGD: the SR-Sinkhorn normalization against its loop written plainly here, its fixed point,
the optimizer's steps, the AdamW groups against torch.optim.AdamW, the paper's parameter split."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normkit.optim import SinkGD, sinkgd_param_groups, sinkhorn_normalize


def sinkhorn_reference(g: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    m, n = g.shape
    x = g.clone()
    for _ in range(iters):
        for i in range(m):
            x[i, :] = math.sqrt(n) * x[i, :] / (math.sqrt(float((x[i, :] ** 2).sum())) + eps)
        for j in range(n):
            x[:, j] = math.sqrt(m) * x[:, j] / (math.sqrt(float((x[:, j] ** 2).sum())) + eps)
    return x


@pytest.mark.parametrize("iters", [1, 5])
def test_sinkhorn_matches_loop(iters):
    g = torch.randn(5, 3, dtype=torch.float64) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [1e-3]], dtype=torch.float64)
    torch.testing.assert_close(sinkhorn_normalize(g, iters, 1e-8), sinkhorn_reference(g, iters, 1e-8), rtol=1e-12, atol=1e-12)


def test_sinkhorn_fixed_point():
    """After enough iterations every row has norm sqrt(n) and every column sqrt(m): ‖X‖_F = sqrt(mn)."""
    g = torch.randn(6, 4, dtype=torch.float64).exp()
    x = sinkhorn_normalize(g, 200, 0.0)
    torch.testing.assert_close(x.norm(dim=1), torch.full((6,), 2.0, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(x.norm(dim=0), torch.full((4,), math.sqrt(6), dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(x.norm(), torch.tensor(math.sqrt(24.0), dtype=torch.float64))
    # stateless and scale-free: the step does not depend on the gradient's overall scale
    torch.testing.assert_close(sinkhorn_normalize(g * 1e4, 5), sinkhorn_normalize(g, 5))


def test_sinkhorn_half_precision_and_shape_check():
    g = torch.randn(8, 16, dtype=torch.bfloat16)
    out = sinkhorn_normalize(g)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sinkhorn_normalize(g.float()), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_normalize(torch.randn(3))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sinkgd_steps_match_rule(weight_decay):
    w0 = torch.randn(4, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    p = nn.Parameter(w0.clone())
    opt = SinkGD([p], lr=0.01, num_iters=3, weight_decay=weight_decay)
    w = w0.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        w = w * (1 - 0.01 * weight_decay) - 0.01 * sinkhorn_reference(g, 3, 1e-8)
    torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    assert len(opt.state) == 0  # stateless


def test_conv_weights_are_flattened_per_output_channel():
    w0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    g = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = SinkGD([p], lr=0.1, num_iters=2)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * sinkhorn_reference(g.reshape(3, -1), 2, 1e-8).view(3, 2, 2, 2))


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ws = [torch.randn(5), torch.randn(3, 4)]
    ours = [nn.Parameter(w.clone()) for w in ws]
    ref = [nn.Parameter(w.clone()) for w in ws]
    opt = SinkGD([{"params": ours, "algorithm": "adamw", "weight_decay": 0.01}], lr=1e-2, betas=(0.8, 0.99), adam_eps=1e-7)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01)
    for _ in range(4):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        opt_ref.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.block(h))


def test_param_groups_follow_the_paper_split():
    model = TinyLM()
    groups = sinkgd_param_groups(model, adamw={"lr": 1e-3})
    assert groups[0]["params"] == [model.block[1].weight, model.block[3].weight]
    assert groups[0]["algorithm"] == "sinkgd" and groups[1]["algorithm"] == "adamw" and groups[1]["lr"] == 1e-3
    assert {id(p) for p in groups[1]["params"]} == {
        id(model.embed.weight), id(model.block[0].weight), id(model.block[0].bias), id(model.block[1].bias),
        id(model.block[3].bias), id(model.head.weight),
    }
    tied = TinyLM()
    tied.head.weight = tied.embed.weight
    assert sinkgd_param_groups(tied, head=[])[0]["params"] == [tied.block[1].weight, tied.block[3].weight]
    with pytest.raises(ValueError, match="head names"):
        sinkgd_param_groups(model, head=["nope"])


def test_trains_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (4, 6))
    target = torch.randint(0, 11, (4, 6))

    def train(m, opt, steps):
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(ids).flatten(0, 1), target.flatten())
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    opt = SinkGD(sinkgd_param_groups(model), lr=1e-2)
    losses = train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    losses += train(model, opt, 12)
    assert losses[-1] < losses[0]
    model2 = TinyLM()
    model2.load_state_dict(saved_model)
    opt2 = SinkGD(sinkgd_param_groups(model2), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, 12)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=0.1, num_iters=0), "num_iters"),
        (dict(lr=0.1, eps=-1.0), "eps"),
        (dict(lr=0.1, betas=(0.9, 1.5)), "beta"),
        (dict(lr=0.1, algorithm="adam"), "algorithm"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkGD([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_vectors_need_an_adamw_group():
    with pytest.raises(ValueError, match="algorithm='adamw'"):
        SinkGD([nn.Parameter(torch.zeros(3))], lr=0.1)


def test_sinkhorn_zero_rows_and_columns_stay_zero():
    """A zero row (a dead unit) or column must give zeros, not inf · 0 = NaN, after many iterations in float32."""
    g = torch.randn(6, 5)
    g[2] = 0.0
    g[:, 3] = 0.0
    out = sinkhorn_normalize(g, 30)
    assert torch.isfinite(out).all() and (out[2] == 0).all() and (out[:, 3] == 0).all()
    ref = sinkhorn_reference(g.double(), 30, 1e-8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
