"""normkit.nn.replace.replace_modules: the one helper every converter (IBN, WS, AdaB2N, TTA) uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normkit.nn.replace import ReplaceReport, replace_modules


def _is_bn(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


def _to_gn(name: str, m: nn.Module) -> nn.Module:
    return nn.GroupNorm(1, m.num_features)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.inner = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.empty = None


def _net() -> nn.Module:
    return nn.Sequential(
        Block(4),
        nn.ModuleList([nn.BatchNorm2d(4), nn.ReLU()]),
        nn.ModuleDict({"a": nn.BatchNorm2d(4), "b": nn.Identity()}),
    )


def test_nested_sequential_modulelist_moduledict_and_report():
    net = _net()
    report = replace_modules(net, _is_bn, _to_gn)
    assert isinstance(report, ReplaceReport) and isinstance(report, list) and report.model is net
    assert report == [
        ("0.bn", nn.BatchNorm2d, nn.GroupNorm),
        ("0.inner.1", nn.BatchNorm2d, nn.GroupNorm),
        ("1.0", nn.BatchNorm2d, nn.GroupNorm),
        ("2.a", nn.BatchNorm2d, nn.GroupNorm),
    ]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net[1][0], nn.GroupNorm) and isinstance(net[2]["a"], nn.GroupNorm)
    assert net[0].empty is None and isinstance(net[1][1], nn.ReLU)
    assert [n for n, _ in net.named_modules()][:3] == ["", "0", "0.conv"]


def test_match_sees_named_modules_order_and_names_and_root():
    net = _net()
    seen: list[str] = []
    replace_modules(net, lambda n, m: seen.append(n) or False, _to_gn)
    assert seen == [n for n, _ in net.named_modules()]


def test_root_can_be_replaced():
    bn = nn.BatchNorm2d(3)
    report = replace_modules(bn, _is_bn, _to_gn)
    assert report == [("", nn.BatchNorm2d, nn.GroupNorm)]
    assert isinstance(report.model, nn.GroupNorm) and isinstance(bn, nn.BatchNorm2d)


def test_shared_module_built_once_and_placed_everywhere():
    shared = nn.BatchNorm2d(4)
    net = nn.Sequential(shared, nn.Sequential(nn.ReLU(), shared), shared)
    calls: list[str] = []

    def build(name: str, m: nn.Module) -> nn.Module:
        calls.append(name)
        return nn.GroupNorm(1, 4)

    report = replace_modules(net, _is_bn, build)
    assert calls == ["0"]
    assert [r[0] for r in report] == ["0", "1.1", "2"]
    assert net[0] is net[1][1] is net[2] and isinstance(net[0], nn.GroupNorm)


def test_never_revisits_what_it_built():
    # a builder that wraps the old module in a container holding a module of the matched type
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    calls = []

    def wrap(name: str, m: nn.Module) -> nn.Module:
        calls.append(name)
        return nn.Sequential(m, nn.BatchNorm2d(4))

    report = replace_modules(net, _is_bn, wrap)
    assert calls == ["0", "1"] and len(report) == 2
    assert isinstance(net[0], nn.Sequential) and isinstance(net[0][0], nn.BatchNorm2d)


def test_build_none_keeps_the_module_and_walks_its_children():
    net = nn.Sequential(nn.Sequential(nn.BatchNorm2d(4)), nn.BatchNorm2d(4))
    report = replace_modules(
        net, lambda n, m: isinstance(m, (nn.Sequential, nn.BatchNorm2d)) and n != "",
        lambda n, m: None if isinstance(m, nn.Sequential) else _to_gn(n, m),
    )
    assert [r[0] for r in report] == ["0.0", "1"]
    assert isinstance(net[0], nn.Sequential) and isinstance(net[0][0], nn.GroupNorm)


def test_in_place_change_is_reported_and_keeps_the_object():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin)

    class Marked(nn.Linear):
        pass

    def swap(name: str, m: nn.Module) -> nn.Module:
        m.__class__ = Marked
        return m

    report = replace_modules(net, lambda n, m: type(m) is nn.Linear, swap)
    assert report == [("0", nn.Linear, Marked)] and net[0] is lin and type(lin) is Marked


def test_inplace_false_leaves_the_original_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net.modules()]
    report = replace_modules(net, _is_bn, _to_gn, inplace=False)
    assert report.model is not net and len(report) == 4
    assert [type(m) for m in net.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in report.model.modules())
    # the copy's untouched modules are copies too
    assert report.model[0].conv is not net[0].conv


def test_training_mode_device_and_dtype_kept():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)).double()
    net[0].eval()
    replace_modules(net, _is_bn, _to_gn)  # builder makes float32, train-mode modules
    assert not net[0].training and net[1].training
    assert all(p.dtype == torch.float64 for p in net.parameters())
    if torch.cuda.is_available():
        net = nn.Sequential(nn.BatchNorm2d(4).cuda().half().eval())
        replace_modules(net, _is_bn, _to_gn)
        assert net[0].weight.device.type == "cuda" and net[0].weight.dtype == torch.float16 and not net[0].training


def test_parameterless_replacement_keeps_its_buffer_dtypes():
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(4))  # float32 on purpose

    net = nn.Sequential(nn.BatchNorm2d(4, affine=False).half())
    replace_modules(net, _is_bn, lambda n, m: Stats())
    assert net[0].mean.dtype == torch.float32


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        replace_modules([nn.ReLU()], _is_bn, _to_gn)  # type: ignore[arg-type]
