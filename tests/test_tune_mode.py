"""tune_mode_convbn: same forward and gradients as conv → BN(eval), fewer saved tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
from normkit.convert.tune_mode import saved_tensor_bytes, tune_mode_convbn
from normkit.models.resnet import ResNet


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def _eval_bn_reference(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """conv → BN(eval) written out: (conv(x) − μ) / √(σ² + eps) · γ + β."""
    y = nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    v = (1, -1, 1, 1)
    return (y - bn.running_mean.view(v)) / torch.sqrt(bn.running_var.view(v) + bn.eps) * bn.weight.view(v) + bn.bias.view(v)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, normkit.BatchNorm2d])
def test_forward_and_gradients_equal_eval_mode(bias, bn_cls):
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias, groups=1), bn_cls(4), nn.ReLU())).double().eval()
    tuned = copy.deepcopy(model)
    report = tune_mode_convbn(tuned)
    assert report.pairs == [("0", "1")]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    y, yt = model(x), tuned(xt)
    torch.testing.assert_close(yt, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(tuned[0](xt.detach()), _eval_bn_reference(model[0], model[1], x.detach()), rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xt.grad, x.grad, rtol=0, atol=1e-12)
    for (n, p), (_, pt) in zip(model.named_parameters(), tuned.named_parameters()):
        torch.testing.assert_close(pt.grad, p.grad, rtol=0, atol=1e-12, msg=n)
    assert set(tuned.state_dict()) == set(model.state_dict())  # keys unchanged: checkpoints load both ways


def test_gradcheck_float64():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3))).double().eval()
    tune_mode_convbn(model)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w, gamma = model[0].weight, model[1].weight
    torch.autograd.gradcheck(lambda x, w, gamma: model(x), (x, w, gamma))


def test_train_mode_is_untouched_and_restore():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    ref = copy.deepcopy(model)
    report = tune_mode_convbn(model)
    x = torch.randn(4, 3, 3, 3)
    model.train()
    ref.train()
    torch.testing.assert_close(model(x), ref(x))  # Train mode: conv → BN with batch statistics, running stats updated
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    report.restore()
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    torch.testing.assert_close(model(x), ref(x))


def test_resnet_saves_fewer_tensors_with_equal_gradients():
    torch.manual_seed(0)
    base = _randomise_bn(ResNet("basic", (1, 1, 1, 1), widths=(4, 4, 8, 8), stem_width=4, num_classes=3, small_input=True))
    base = base.double().eval()
    tuned = copy.deepcopy(base)
    report = tune_mode_convbn(tuned)
    assert len(report.pairs) == 12 and report.adjacency == "fx"
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    sizes = {}
    for label, net in (("eval", base), ("tune", tuned)):
        sizes[label] = saved_tensor_bytes(lambda net=net: net(x).sum().backward(), list(net.parameters()))
    assert sizes["tune"] < 0.8 * sizes["eval"], sizes
    for (n, p), (_, q) in zip(base.named_parameters(), tuned.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=n)


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        tune_mode_convbn(3)
    with pytest.raises(ValueError, match="no Conv → BatchNorm pair"):
        tune_mode_convbn(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        tune_mode_convbn(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)))


def test_measure_runs_on_a_tiny_resnet():
    from normkit.convert.measure import measure_fold, measure_tune_mode

    f = measure_fold(batch=2, size=8, widths=(4, 4, 4, 4), repeats=1)
    assert f["folded"] == 20 and f["max_abs_diff"] < 1e-4 and f["eval_ms"] > 0
    t = measure_tune_mode(batch=4, size=16, widths=(4, 4, 4, 4), repeats=1)
    assert t["tune_saved_mb"] < t["eval_saved_mb"] and t["max_grad_diff"] < 1e-4


class _Untraceable(nn.Module):
    """A data-dependent forward (fx traces only the children) that calls ``block.0`` also as ``conv``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.conv = self.block[0]
        self.other = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.block(x) + self.conv(x) + self.other(x)


def test_a_conv_registered_twice_is_not_patched():
    """The per-submodule trace pairs (block.0, block.1), but the patch would also fuse the BN into the
    conv's call as ``conv``: that conv is skipped, the other pair is patched, the output is unchanged."""
    model = _randomise_bn(_Untraceable()).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = model(x)
    report = tune_mode_convbn(model)
    assert report.pairs == [("other.0", "other.1")], str(report)
    assert any("registered as" in why for _, why in report.skipped)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
