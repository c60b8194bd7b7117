"""IBN (Instance-Batch Normalization) and the IBN-a / IBN-b ResNet placements of the official IBN-Net code."""

import io

import pytest
import torch

from normkit.models.resnet import (
    IBN_CFG,
    BasicBlock,
    Bottleneck,
    ResNet,
    _enable_post_add_in,
    make_ibn,
    resnet,
    to_ibn_a,
    to_ibn_b,
)
from normkit.nn.batch_norm import BatchNorm, InstanceNorm
from normkit.nn.ibn import IBN
from normkit.registry import norm_info

D = torch.float64


def ref_ibn_train(x, half, in_w, in_b, bn_w, bn_b, eps=1e-5):
    a, b = x[:, :half], x[:, half:]
    # InstanceNorm: per sample and channel over (H, W)
    m = a.mean(dim=(2, 3), keepdim=True)
    v = ((a - m) ** 2).mean(dim=(2, 3), keepdim=True)
    ya = (a - m) / torch.sqrt(v + eps) * in_w.view(1, -1, 1, 1) + in_b.view(1, -1, 1, 1)
    # BatchNorm: per channel over (N, H, W)
    m = b.mean(dim=(0, 2, 3), keepdim=True)
    v = ((b - m) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    yb = (b - m) / torch.sqrt(v + eps) * bn_w.view(1, -1, 1, 1) + bn_b.view(1, -1, 1, 1)
    return torch.cat([ya, yb], 1)


class OfficialIBN(torch.nn.Module):
    """ibnnet/modules.py IBN, with torch's modules."""

    def __init__(self, planes, ratio=0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = torch.nn.InstanceNorm2d(self.half, affine=True)
        self.BN = torch.nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        split = torch.split(x, self.half, 1)
        return torch.cat((self.IN(split[0].contiguous()), self.BN(split[1].contiguous())), 1)


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)


def test_registered():
    info = norm_info("ibn")
    assert info.cls is IBN and info.layout == "channels_first" and info.paper.arxiv == "1807.09441"
    assert info.batch_dependent and info.train_eval_differ


@pytest.mark.parametrize(("planes", "ratio", "half"), [(8, 0.5, 4), (7, 0.5, 3), (10, 0.25, 2), (6, 0.9, 5)])
def test_forward_train_eval_and_running_stats(planes, ratio, half):
    m = IBN(planes, ratio).double()
    _randomize(m)
    assert m.half == half  # int(planes * ratio), truncated
    rm, rv = torch.zeros(planes - half, dtype=D), torch.ones(planes - half, dtype=D)
    for _ in range(2):
        x = torch.randn(3, planes, 4, 5, dtype=D) * 2 + 1
        torch.testing.assert_close(m(x), ref_ibn_train(x, half, m.IN.weight, m.IN.bias, m.BN.weight, m.BN.bias))
        b = x[:, half:]
        bm = b.mean(dim=(0, 2, 3))
        bv = ((b - bm.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (b.numel() // b.shape[1] - 1)
        rm, rv = 0.9 * rm + 0.1 * bm, 0.9 * rv + 0.1 * bv
        torch.testing.assert_close(m.BN.running_mean, rm)
        torch.testing.assert_close(m.BN.running_var, rv)
    m.eval()
    x = torch.randn(2, planes, 4, 5, dtype=D)
    y = m(x)
    # eval: IN still uses the sample's statistics, BN the running ones
    a = ref_ibn_train(x, half, m.IN.weight, m.IN.bias, m.BN.weight, m.BN.bias)[:, :half]
    b = (x[:, half:] - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + 1e-5)
    b = b * m.BN.weight.view(1, -1, 1, 1) + m.BN.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, torch.cat([a, b], 1))


def test_matches_official_and_loads_its_state_dict():
    ours, theirs = IBN(8), OfficialIBN(8)
    _randomize(theirs)
    with torch.no_grad():
        theirs.BN.running_mean.uniform_(-1, 1)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 8, 3, 3)
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x))
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    OfficialIBN(8).load_state_dict(torch.load(buf, weights_only=True), strict=True)


@pytest.mark.slow
def test_gradcheck_float64():
    m = IBN(4).double()
    _randomize(m)
    x = torch.randn(3, 4, 2, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_errors():
    with pytest.raises(ValueError, match=r"int\(planes \* ratio\) = int\(1 \* 0.5\) = 0"):
        IBN(1)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        IBN(8, ratio=1.0)
    with pytest.raises(ValueError, match=r"expects 8 channels at dim 1.*got 4"):
        IBN(8)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="at least 3 dims"):
        IBN(8)(torch.randn(2, 8))


# --------------------------------------------------------------------------- ResNet placements

TINY = {"widths": (4, 4, 8, 8), "stem_width": 4, "num_classes": 3}


def _norm_types(model):
    return {name: type(m) for name, m in model.named_modules()}


def _assert_ibn_a(model, layers):
    assert type(model.bn1) is not InstanceNorm and isinstance(model.bn1, BatchNorm)
    for s, n in enumerate(layers, start=1):
        stage = getattr(model, f"layer{s}")
        assert len(stage) == n
        for blk in stage:
            assert isinstance(blk.bn1, IBN) == (s <= 3), (s, type(blk.bn1))
            assert isinstance(blk.bn2, BatchNorm)
            assert getattr(blk, "IN", None) is None
        if stage[0].downsample is not None:
            assert isinstance(stage[0].downsample[1], BatchNorm)


def _assert_ibn_b(model, layers):
    assert type(model.bn1) is InstanceNorm and model.bn1.affine and model.bn1.running_mean is None
    for s, n in enumerate(layers, start=1):
        stage = getattr(model, f"layer{s}")
        for i, blk in enumerate(stage):
            want_in = s <= 2 and n > 1 and i == n - 1
            assert isinstance(blk.IN, InstanceNorm) == want_in, (s, i)
            if want_in:
                last_conv = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
                assert blk.IN.num_features == last_conv.out_channels and blk.IN.affine
            assert not isinstance(blk.bn1, IBN)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_official_placements_built_and_converted(block):
    layers = (2, 3, 2, 2)
    a = ResNet(block, layers, ibn_cfg=IBN_CFG["a"], **TINY)
    _assert_ibn_a(a, layers)
    b = ResNet(block, layers, ibn_cfg=IBN_CFG["b"], **TINY)
    _assert_ibn_b(b, layers)
    # converting a plain ResNet gives the same modules and the same state-dict keys and shapes
    for placement, built in (("a", a), ("b", b)):
        conv = make_ibn(ResNet(block, layers, **TINY), placement)
        assert _norm_types(conv) == _norm_types(built)
        assert {k: v.shape for k, v in conv.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        for mode in (True, False):
            m.train(mode)
            assert m(x).shape == (2, 3)


def test_official_key_names():
    m = resnet(50, ibn="a", **TINY)
    keys = set(m.state_dict())
    assert {
        "layer1.0.bn1.IN.weight",
        "layer1.0.bn1.BN.running_mean",
        "layer3.5.bn1.IN.bias",
        "layer4.0.bn1.running_var",
        "layer1.0.downsample.1.weight",
        "fc.weight",
    } <= keys
    m = resnet(18, ibn="b", **TINY)
    keys = set(m.state_dict())
    assert {"bn1.weight", "layer1.1.IN.weight", "layer2.1.IN.bias"} <= keys
    assert "bn1.running_mean" not in keys and "layer1.0.IN.weight" not in keys and "layer3.1.IN.weight" not in keys


def test_single_block_stage_gets_no_ibn_b():
    layers = (1, 1, 1, 1)
    m = ResNet("basic", layers, ibn_cfg=IBN_CFG["b"], **TINY)
    assert all(blk.IN is None for s in (m.layer1, m.layer2) for blk in s)
    conv = to_ibn_b(ResNet("basic", layers, **TINY))
    assert all(blk.IN is None for s in (conv.layer1, conv.layer2) for blk in s)


def test_ibn_b_post_addition_position():
    # the IN of IBN-b acts on (residual branch + identity), before the last ReLU
    blk = BasicBlock(4, 4, ibn="b").double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    branch = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(x)))))
    torch.testing.assert_close(blk(x), torch.relu(blk.IN(branch + x)))


class TorchvisionBasicBlock(torch.nn.Module):
    """torchvision.models.resnet.BasicBlock's structure (torchvision is not a dependency)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionLike(torch.nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        ds = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, 2, bias=False), torch.nn.BatchNorm2d(8))
        self.layer1 = torch.nn.Sequential(TorchvisionBasicBlock(4, 4), TorchvisionBasicBlock(4, 4))
        self.layer2 = torch.nn.Sequential(TorchvisionBasicBlock(4, 8, 2, ds), TorchvisionBasicBlock(8, 8))
        self.layer3 = torch.nn.Sequential(TorchvisionBasicBlock(8, 8))
        self.layer4 = torch.nn.Sequential(TorchvisionBasicBlock(8, 8))
        if extra:
            self.layer2[1].se = torch.nn.Identity()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def test_converts_torchvision_style_resnets():
    torch.manual_seed(0)
    tv = TorchvisionLike()
    with torch.no_grad():
        tv.bn1.weight.uniform_(0.5, 1.5)
        tv.layer1[0].bn1.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 32, 32)
    ref = tv.eval()(x)
    stem_w = tv.bn1.weight.detach().clone()
    rm = tv.layer1[0].bn1.running_mean.detach().clone()

    a = to_ibn_a(TorchvisionLike())
    assert all(isinstance(blk.bn1, IBN) for s in (a.layer1, a.layer2, a.layer3) for blk in s)
    assert isinstance(a.layer4[0].bn1, torch.nn.BatchNorm2d)

    a2 = to_ibn_a(tv, keep_weights=True)  # carries the BN statistics of the BN half over
    torch.testing.assert_close(a2.layer1[0].bn1.BN.running_mean, rm[2:])

    b = TorchvisionLike()
    with torch.no_grad():
        b.bn1.weight.copy_(stem_w)
    to_ibn_b(b)
    assert type(b.bn1) is InstanceNorm
    torch.testing.assert_close(b.bn1.weight.detach(), stem_w)  # affine carried over
    assert type(b.layer1[1]) is BasicBlock and isinstance(b.layer1[1].IN, InstanceNorm)
    assert type(b.layer2[1]) is BasicBlock and isinstance(b.layer2[1].IN, InstanceNorm)
    assert type(b.layer1[0]) is TorchvisionBasicBlock and type(b.layer3[0]) is TorchvisionBasicBlock
    assert b(x).shape == ref.shape

    # the swapped-in forward is torchvision's when IN is None
    blk = TorchvisionLike().layer2[1].eval()
    z = torch.randn(2, 8, 4, 4)
    before = blk(z)
    _enable_post_add_in(blk)
    assert type(blk) is BasicBlock and blk.IN is None
    torch.testing.assert_close(blk(z), before)

    with pytest.raises(TypeError, match=r"modules \['se'\] beyond torchvision"):
        to_ibn_b(TorchvisionLike(extra=True))


def test_conversion_errors():
    with pytest.raises(TypeError, match="layer1..layer4"):
        to_ibn_a(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="placement must be 'a' or 'b'"):
        make_ibn(ResNet(**TINY), "c")
    with pytest.raises(ValueError, match="ibn must be None, 'a' or 'b'"):
        ResNet(ibn_cfg=("x", None, None, None), **TINY)
    with pytest.raises(ValueError, match="layers must have 4 entries"):
        ResNet(layers=(2, 2), **TINY)
    with pytest.raises(ValueError, match="resnet depth must be one of"):
        resnet(20)
    assert Bottleneck.expansion == 4
