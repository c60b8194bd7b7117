"""Norm-only training, random-subset control, frozen/recomputed statistics, γ report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normkit.adapt.norm_only import (
    freeze_norm_stats,
    gamma_report,
    norm_parameter_count,
    recompute_norm_stats,
    train_only_norms,
    train_random_subset,
)
from normkit.bench.models import SmallCNN
from normkit.nn.batch_norm import BatchNorm2d, GroupNorm
from normkit.nn.layer_norm import LayerNorm


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _step(model, x, opt):
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_train_only_batchnorm_affine():
    torch.manual_seed(0)
    model = SmallCNN("batchnorm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = train_only_norms(model)
    assert summary.trainable == norm_parameter_count(model) == 2 * (16 + 32 + 32)
    assert summary.names == tuple(f"features.{i}.{p}" for i in (1, 4, 7) for p in ("weight", "bias"))
    assert "160 of" in str(summary)
    _step(model, _x(8, 1, 8, 8), torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    for k, v in model.state_dict().items():
        moved = not torch.equal(v, before[k])
        trains = k.endswith(("weight", "bias")) and k.startswith(("features.1.", "features.4.", "features.7."))
        stats = "running" in k or "num_batches" in k
        assert moved == (trains or stats), k


def test_shift_only_layer_norms_and_extra_modules():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), BatchNorm2d(4), GroupNorm(4, num_groups=2), nn.Flatten(),
        nn.Linear(36, 6), LayerNorm(6), nn.Linear(6, 2),
    )  # fmt: skip
    assert train_only_norms(model, include=("bias",)).names == ("1.bias",)  # MobileTL: shifts only
    assert train_only_norms(model, norms="layer").names == ("5.weight", "5.bias")  # LN-tuning
    assert set(train_only_norms(model, norms="all").names) == {f"{i}.{p}" for i in (1, 2, 5) for p in ("weight", "bias")}
    both = train_only_norms(model, also=("6",))
    assert both.names == ("1.weight", "1.bias", "6.weight", "6.bias") and both.trainable == 8 + 14
    with pytest.raises(ValueError, match=r"no parameter named \('gamma',\)"):
        train_only_norms(model, include=("gamma",))
    with pytest.raises(ValueError, match="norms must be one of"):
        train_only_norms(model, norms="instance")
    with pytest.raises(ValueError, match="no parameter"):
        train_only_norms(nn.Linear(2, 2))


def test_random_subset_trains_exactly_count_scalars_outside_norms():
    torch.manual_seed(0)
    model = SmallCNN("batchnorm")
    n = norm_parameter_count(model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    summary = train_random_subset(model, n, seed=3)
    assert summary.trainable == n
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for i in range(3):
        _step(model, _x(8, 1, 8, 8, seed=i), opt)
    changed = sum(int((p != before[k]).sum()) for k, p in model.named_parameters())
    assert changed == n
    for k, p in model.named_parameters():
        if k.startswith(("features.1.", "features.4.", "features.7.")):
            assert torch.equal(p, before[k])
    with pytest.raises(ValueError, match="exceeds"):
        train_random_subset(SmallCNN("batchnorm"), 10**9)


def test_freeze_norm_stats_survives_train_mode_and_is_removable():
    torch.manual_seed(0)
    model = SmallCNN("batchnorm")
    model.train()
    model(_x(16, 1, 8, 8))  # some statistics
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    handle = freeze_norm_stats(model)
    model.train()
    x = _x(4, 1, 8, 8, seed=1)
    y = model(x)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    model.eval()
    assert torch.equal(y, model(x))  # normalized with the running statistics in train mode
    handle.remove()
    model.train()
    model(x)
    assert not torch.equal(model.features[1].running_mean, stats["features.1.running_mean"])
    no_stats = nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False))
    with freeze_norm_stats(no_stats) as h:
        assert h.skipped == ["0"] and h.layers == []
    with pytest.raises(ValueError, match="no batch-dependent norm"):
        freeze_norm_stats(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))


def test_recompute_norm_stats_is_the_average_over_batches():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, bias=False)
    model = nn.Sequential(conv, BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    batches = [_x(4, 1, 5, 5, seed=i) * (1 + i) for i in range(3)]
    seen = recompute_norm_stats(model, [(b, torch.zeros(4)) for b in batches])
    assert seen == 12
    with torch.no_grad():
        feats = [conv(b) for b in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    n = feats[0].numel() // 3
    vars_ = torch.stack([((f - m.reshape(1, 3, 1, 1)) ** 2).sum((0, 2, 3)) / (n - 1) for f, m in zip(feats, means)])
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, vars_.mean(0))
    assert bn.momentum == 0.3 and model.training and model[3].training  # modes and momentum restored
    assert recompute_norm_stats(model, iter(batches), num_batches=1) == 4
    torch.testing.assert_close(bn.running_mean, means[0])
    with pytest.raises(ValueError, match="no batch-dependent norm"):
        recompute_norm_stats(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(TypeError, match="each batch must be"):
        recompute_norm_stats(model, ["nope"])


def test_gamma_report_counts_near_zero_scales():
    model = SmallCNN("batchnorm")
    with torch.no_grad():
        model.features[1].weight[:4] = 0.001
        model.features[4].weight[:2] = -0.005
        model.features[7].weight[:1] = 0.02
    r = gamma_report(model)
    assert (r.near_zero, r.total) == (6, 80)
    assert r.per_layer == {"features.1": (4, 16), "features.4": (2, 32), "features.7": (0, 32)}
    assert r.fraction == pytest.approx(6 / 80) and "6 of 80" in str(r)
    assert gamma_report(model, 0.05).near_zero == 7
    with pytest.raises(ValueError, match="threshold"):
        gamma_report(model, 0.0)
