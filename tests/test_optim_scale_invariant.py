"""find_scale_invariant / scale_invariant_params / scale_invariant_groups on models whose answer is
known by hand (each case's reason is written next to it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit.optim import AdamP, find_scale_invariant, scale_invariant_groups, scale_invariant_params


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)  # bias removed by BN: channel
        self.c2, self.g2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8)  # layer
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)  # also feeds a residual: not invariant
        self.c4, self.b4 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)  # through dropout, relu, maxpool: channel
        self.drop = nn.Dropout(0.2)
        self.fc, self.ln = nn.Linear(8 * 4 * 4, 16, bias=False), nn.LayerNorm(16)  # layer
        self.fc2, self.ln2 = nn.Linear(16, 16), nn.LayerNorm(16)  # bias before LayerNorm: not invariant
        self.c5, self.b5 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # bias, then ReLU, then BN: not invariant
        self.head = nn.Linear(16, 3)  # no norm after it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.g2(self.c2(x)))
        y = self.c3(x)
        x = torch.relu(self.b3(y)) + y
        x = x + self.b5(torch.relu(self.c5(x)))
        x = self.b4(nn.functional.max_pool2d(torch.relu(self.drop(self.c4(x))), 2))
        x = self.ln(self.fc(x.flatten(1)))
        return self.head(self.ln2(self.fc2(x)))


class QKNorm(nn.Module):
    """Per-head RMSNorm on queries (bias-free projection, reshaped to heads): q_proj is layer-invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.q_norm = nn.RMSNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_norm(self.q_proj(x).view(*x.shape[:-1], 4, 4))
        return (q.flatten(-2) * self.v_proj(x)).sum(-1)


def test_mixed_model_rule_and_verification():
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(4, 3, 8, 8)
    rule_only = find_scale_invariant(model, x, verify=False)
    # the rule cannot see the residual on c3's output; the numeric check removes it
    assert rule_only == {
        "c1.weight": "channel", "c2.weight": "layer", "c3.weight": "channel", "c4.weight": "channel", "fc.weight": "layer",
    }
    assert find_scale_invariant(model, x) == {
        "c1.weight": "channel", "c2.weight": "layer", "c4.weight": "channel", "fc.weight": "layer",
    }


def test_found_weights_are_invariant_by_direct_check():
    """Independent of the module's own check: scale each found weight and compare the training-mode output."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4), nn.ReLU(inplace=True),
                             nn.Conv2d(4, 4, 3, bias=False), normkit.LayerNorm2d(4)), torch.randn(4, 3, 8, 8)
    found = find_scale_invariant(model, x)
    assert found == {"0.weight": "channel", "3.weight": "layer"}
    params = dict(model.named_parameters())
    base = model.train()(x).detach()
    with torch.no_grad():
        params["0.weight"].mul_(torch.tensor([0.5, 1.5, 3.0, 0.7]).view(4, 1, 1, 1))
        params["3.weight"].mul_(4.0)
    # exact up to the norms' eps (LayerNorm2d over 4 channels has small per-position variances)
    torch.testing.assert_close(model(x), base, rtol=1e-2, atol=1e-3 * float(base.abs().max()))


def test_qk_norm_projection_is_found():
    torch.manual_seed(0)
    model = QKNorm()
    assert find_scale_invariant(model, torch.randn(2, 5, 16)) == {"q_proj.weight": "layer"}
    assert scale_invariant_params(model, torch.randn(2, 5, 16)) == [model.q_proj.weight]


def test_linear_into_batchnorm1d_and_transposed_convolutions():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))  # (N, C): BatchNorm1d's channels are the linear's rows
    assert find_scale_invariant(mlp, torch.randn(8, 5)) == {"0.weight": "channel"}

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.bn = nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4)  # weight (in, out): layer view
            self.up2, self.gn = nn.ConvTranspose2d(4, 4, 2, bias=False), nn.GroupNorm(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gn(self.up2(self.bn(self.up(x))))

    assert find_scale_invariant(Up(), torch.randn(4, 3, 5, 5)) == {"up.weight": "layer", "up2.weight": "layer"}


def test_modes_and_running_statistics_are_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_scale_invariant(model, torch.randn(4, 3, 8, 8))
    assert not model.training and not model[1].training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_groups_feed_adamp_and_keyword_inputs():
    torch.manual_seed(0)

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 2))

        def forward(self, *, inputs: torch.Tensor) -> torch.Tensor:
            return self.body(inputs)

    model = Kw()
    groups = scale_invariant_groups(model, {"inputs": torch.randn(5, 6)}, rest="off", weight_decay=0.1)
    assert [g["projection"] for g in groups] == ["layer", "off"]
    assert groups[0]["params"] == [model.body[0].weight] and all(g["weight_decay"] == 0.1 for g in groups)
    opt = AdamP(groups, lr=1e-2)
    w0 = model.body[0].weight.detach().clone()
    model(inputs=torch.randn(5, 6)).sum().backward()
    opt.step()
    # layer projection with decay 0.1·wd_ratio: the norm grows only by second-order terms
    assert model.body[0].weight.norm() <= w0.norm() * (1 + 1e-3)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        find_scale_invariant(lambda x: x, torch.zeros(1))
    with pytest.raises(ValueError, match="'channel' or 'layer'"):
        find_scale_invariant(nn.Linear(2, 2), torch.zeros(1, 2), norm_types={nn.Identity: "row"})
    with pytest.raises(ValueError, match="projection"):
        scale_invariant_groups(nn.Linear(2, 2), torch.zeros(1, 2), rest="sometimes")
    with pytest.raises(ValueError, match="rest="):
        scale_invariant_groups(nn.Linear(2, 2), torch.zeros(1, 2), projection="off")
