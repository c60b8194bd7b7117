"""A small torchvision-style ResNet and the IBN-Net conversions (IBN-a, IBN-b).

Pan, Luo, Shi, Tang, "Two at Once: Enhancing Learning and Generalization Capacities via
IBN-Net", ECCV 2018, arXiv:1807.09441. Official code: ``XingangPan/IBN-Net``
(``ibnnet/resnet_ibn.py``). The ResNet here has the official (and torchvision's) attribute
names — ``conv1``, ``bn1``, ``layer1``..``layer4``, blocks with ``conv1``/``bn1``/…/``downsample``
and the IBN-b ``IN`` — so state-dict keys match the official IBN-Net checkpoints, and
:func:`to_ibn_a` / :func:`to_ibn_b` also convert torchvision ResNets.

Placements (official ``ibn_cfg``):

* **IBN-a** ``('a', 'a', 'a', None)``: in every block of ``layer1``–``layer3`` the norm after the
  first convolution, ``bn1``, becomes :class:`~normkit.nn.ibn.IBN` (IN on half the channels).
  ``layer4``, the stem and the downsample norms stay BatchNorm.
* **IBN-b** ``('b', 'b', None, None)``: the stem norm ``bn1`` becomes ``InstanceNorm(64,
  affine=True)``; in ``layer1`` and ``layer2`` only the *last* block gets ``IN =
  InstanceNorm(planes · expansion, affine=True)`` applied after the residual addition, before
  the final ReLU. A stage with a single block gets none (the official loop gives the first
  block ``None`` and only later blocks the ``'b'``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit.nn.batch_norm import BatchNorm2d, InstanceNorm
from normkit.nn.ibn import IBN
from normkit.nn.replace import replace_modules

IBNPlacement = Literal["a", "b"]
NormLayer = Callable[[int], nn.Module]

#: ``ibn_cfg`` of the official builders for each placement.
IBN_CFG: dict[str, tuple[str | None, ...]] = {"a": ("a", "a", "a", None), "b": ("b", "b", None, None)}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _check_ibn(ibn: str | None) -> None:
    if ibn not in (None, "a", "b"):
        raise ValueError(f"ibn must be None, 'a' or 'b', got {ibn!r}")


class _ResidualBlock(nn.Module, metaclass=abc.ABCMeta):
    """What :class:`BasicBlock` and :class:`Bottleneck` share: the constructor (torchvision's arguments plus
    the official IBN-Net ``ibn`` and ``ratio``) and the end of ``forward``.

    ``ibn='a'``: the norm after the first convolution, ``bn1``, is :class:`IBN`; ``ibn='b'``: ``IN``
    (InstanceNorm, affine) after the residual addition, before the final ReLU. Each block builds its
    convolutions and norms in ``_build`` (in the official attribute order).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        ibn: str | None = None,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer | None = None,
        ratio: float = 0.5,
    ) -> None:
        super().__init__()
        _check_ibn(ibn)
        norm = norm_layer or BatchNorm2d
        self._build(inplanes, planes, stride, norm, IBN(planes, ratio) if ibn == "a" else norm(planes))
        self.IN = InstanceNorm(planes * self.expansion, affine=True) if ibn == "b" else None
        self.downsample = downsample
        self.stride = stride

    @abc.abstractmethod
    def _build(self, inplanes: int, planes: int, stride: int, norm: NormLayer, bn1: nn.Module) -> None:
        """Create the block's convolutions and norms (``bn1`` given) as attributes, in the official order."""

    def _add_shortcut(self, out: Tensor, x: Tensor) -> Tensor:
        """``relu(IN(out + shortcut(x)))``: the residual addition (``downsample(x)`` where set), IBN-b's
        ``IN`` where present, and the final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = out + identity
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """ResNet basic block (two 3×3 convs) with the IBN-Net options of the official ``BasicBlock_IBN``;
    otherwise identical to torchvision's BasicBlock."""

    expansion = 1

    def _build(self, inplanes: int, planes: int, stride: int, norm: NormLayer, bn1: nn.Module) -> None:
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._add_shortcut(self.bn2(self.conv2(out)), x)


class Bottleneck(_ResidualBlock):
    """ResNet bottleneck block (1×1, 3×3 with the stride, 1×1 ×4) with the official IBN-Net options."""

    expansion = 4

    def _build(self, inplanes: int, planes: int, stride: int, norm: NormLayer, bn1: nn.Module) -> None:
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = bn1
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._add_shortcut(self.bn3(self.conv3(out)), x)


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet (v1.5: stride on the 3×3 conv) as the official ``ResNet_IBN``, with configurable widths.

    Args:
        block: ``"basic"`` / ``"bottleneck"`` or :class:`BasicBlock` / :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for -50.
        widths: ``planes`` of the four stages (official 64, 128, 256, 512; output channels are
            ``planes · expansion``). Small widths keep tests tiny.
        stem_width: channels of the stem convolution (official 64).
        ibn_cfg: per-stage ``None | 'a' | 'b'`` (official: IBN-a ``('a','a','a',None)``, IBN-b
            ``('b','b',None,None)``; ``'b'`` in stage 1 also makes the stem norm an InstanceNorm).
        ratio: IN fraction of the IBN layers (0.5).
        norm_layer: ``C -> module`` for the plain norms (default :class:`normkit.BatchNorm2d`).
        small_input: 3×3 stride-1 stem and no max-pool (CIFAR-sized input); default is the
            ImageNet stem (7×7 stride 2, 3×3 max-pool).

    Initialisation as official: conv weights ``N(0, 2 / (k·k·out_channels))``, norm weights 1,
    biases 0. The official head is ``AvgPool2d(7)`` (224-pixel input); here adaptive average
    pooling, identical at 224 pixels and valid at any size.
    """

    def __init__(
        self,
        block: str | type[nn.Module] = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        ibn_cfg: Sequence[str | None] = (None, None, None, None),
        ratio: float = 0.5,
        norm_layer: NormLayer | None = None,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        block_cls = _BLOCKS.get(block) if isinstance(block, str) else block
        if block_cls is None:
            raise ValueError(f"block must be 'basic', 'bottleneck' or a block class, got {block!r}")
        for name, seq in (("layers", layers), ("widths", widths), ("ibn_cfg", ibn_cfg)):
            if len(seq) != 4:
                raise ValueError(f"ResNet: {name} must have 4 entries (one per stage), got {tuple(seq)!r}")
        if any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"ResNet: layers must be positive ints, got {tuple(layers)!r}")
        for cfg in ibn_cfg:
            _check_ibn(cfg)
        norm = norm_layer or BatchNorm2d
        self._norm = norm
        self._ratio = ratio
        self.inplanes = stem_width
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = InstanceNorm(stem_width, affine=True) if ibn_cfg[0] == "b" else norm(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block_cls, widths[0], layers[0], stride=1, ibn=ibn_cfg[0])
        self.layer2 = self._make_layer(block_cls, widths[1], layers[1], stride=2, ibn=ibn_cfg[1])
        self.layer3 = self._make_layer(block_cls, widths[2], layers[2], stride=2, ibn=ibn_cfg[2])
        self.layer4 = self._make_layer(block_cls, widths[3], layers[3], stride=2, ibn=ibn_cfg[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block_cls.expansion, num_classes)  # type: ignore[attr-defined]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int, ibn: str | None) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                self._norm(planes * expansion),
            )
        kw = {"norm_layer": self._norm, "ratio": self._ratio}
        # official: the first block never gets 'b'; later blocks get it only if they are the last one
        layers = [block(self.inplanes, planes, None if ibn == "b" else ibn, stride, downsample, **kw)]
        self.inplanes = planes * expansion
        for i in range(1, blocks):
            layers.append(block(self.inplanes, planes, None if (ibn == "b" and i < blocks - 1) else ibn, **kw))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def resnet(depth: int = 18, *, ibn: IBNPlacement | None = None, **kwargs: object) -> ResNet:
    """ResNet-18/34/50/101/152, optionally ``ibn='a'`` / ``'b'`` (the official ``resnet50_ibn_a`` etc.).

    ``kwargs`` go to :class:`ResNet` (``widths``, ``stem_width``, ``num_classes``, …).
    """
    if depth not in _DEPTHS:
        raise ValueError(f"resnet depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
    if ibn is not None and ibn not in IBN_CFG:
        raise ValueError(f"ibn must be None, 'a' or 'b', got {ibn!r}")
    block, layers = _DEPTHS[depth]
    cfg = IBN_CFG[ibn] if ibn else (None, None, None, None)
    return ResNet(block, layers, ibn_cfg=cfg, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- conversions


def _stages(model: nn.Module, what: str) -> list[nn.Module]:
    stages = []
    for i in range(1, 5):
        stage = getattr(model, f"layer{i}", None)
        if not isinstance(stage, nn.Module):
            raise TypeError(
                f"{what} expects a torchvision-style ResNet with attributes layer1..layer4; "
                f"{type(model).__name__} has no module 'layer{i}'"
            )
        stages.append(stage)
    return stages


def _blocks(stage: nn.Module) -> list[nn.Module]:
    return list(stage.children())


def _param_like(m: nn.Module) -> dict[str, object]:
    p = next(m.parameters(), None)
    if p is None:
        p = next(m.buffers(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype if p.is_floating_point() else None}


def _copy_affine(dst: nn.Module, src: nn.Module, sl: slice) -> None:
    if getattr(src, "weight", None) is not None and getattr(dst, "weight", None) is not None:
        dst.weight.data.copy_(src.weight.data[sl])
        dst.bias.data.copy_(src.bias.data[sl])


def _ibn_from(old: nn.Module, channels: int, ratio: float, keep_weights: bool) -> IBN:
    new = IBN(channels, ratio, **_param_like(old))  # type: ignore[arg-type]
    if keep_weights and isinstance(old, _BatchNorm) and old.num_features == channels:
        with torch.no_grad():
            _copy_affine(new.IN, old, slice(0, new.half))
            _copy_affine(new.BN, old, slice(new.half, channels))
            if old.running_mean is not None and old.running_var is not None:
                new.BN.running_mean.copy_(old.running_mean[new.half :])
                new.BN.running_var.copy_(old.running_var[new.half :])
                if old.num_batches_tracked is not None:
                    new.BN.num_batches_tracked.copy_(old.num_batches_tracked)
    return new


def _in_from(old: nn.Module | None, channels: int, keep_weights: bool, like: nn.Module) -> InstanceNorm:
    new = InstanceNorm(channels, affine=True, **_param_like(like))  # type: ignore[arg-type]
    if keep_weights and isinstance(old, _BatchNorm) and old.num_features == channels:
        with torch.no_grad():
            _copy_affine(new, old, slice(0, channels))
    return new


def _out_channels(m: nn.Module, name: str) -> int:
    conv = getattr(m, name, None)
    if conv is None or not hasattr(conv, "out_channels"):
        raise TypeError(f"expected a torchvision-style block with a convolution '{name}', got {type(m).__name__}")
    return int(conv.out_channels)


def to_ibn_a(model: nn.Module, *, ratio: float = 0.5, keep_weights: bool = True) -> nn.Module:
    """Convert a ResNet to IBN-a in place (official ``ibn_cfg=('a','a','a',None)``); returns ``model``.

    In every block of ``layer1``–``layer3``, ``bn1`` (the norm after ``conv1``) becomes
    ``IBN(C, ratio)``. ``keep_weights=True`` carries an existing BatchNorm's affine and running
    statistics over (IN gets the affine of the first ``half`` channels, the BN part everything of
    the rest), so a pretrained ResNet starts close to where it was; fresh layers otherwise.
    Blocks already converted are left alone.
    """
    for stage in _stages(model, "to_ibn_a")[:3]:
        for blk in _blocks(stage):
            if not hasattr(blk, "bn1") or not hasattr(blk, "conv1"):
                raise TypeError(f"to_ibn_a expects blocks with conv1/bn1 (torchvision-style), got {type(blk).__name__}")
            replace_modules(
                blk,
                lambda name, m: name == "bn1" and not isinstance(m, IBN),
                lambda name, m, b=blk: _ibn_from(m, _out_channels(b, "conv1"), ratio, keep_weights),
            )
    return model


_SWAPPABLE = {"conv1", "bn1", "relu", "conv2", "bn2", "conv3", "bn3", "downsample", "IN"}


def _enable_post_add_in(blk: nn.Module) -> None:
    """Give a torchvision block our forward (identical, plus the optional post-addition ``IN``)."""
    if "IN" in blk._modules or "IN" in blk.__dict__:
        return
    extra = {n for n, _ in blk.named_children()} - _SWAPPABLE
    if extra:
        raise TypeError(
            f"to_ibn_b cannot add the post-addition InstanceNorm to {type(blk).__name__}: it has modules "
            f"{sorted(extra)} beyond torchvision's BasicBlock/Bottleneck (conv1, bn1, conv2, bn2, [conv3, bn3], relu, downsample)"
        )
    if not hasattr(blk, "relu"):
        raise TypeError(f"to_ibn_b expects a block with a 'relu' module, got {type(blk).__name__}")
    if not hasattr(blk, "downsample"):
        blk.downsample = None
    blk.__class__ = Bottleneck if hasattr(blk, "conv3") else BasicBlock
    blk.IN = None


def to_ibn_b(model: nn.Module, *, keep_weights: bool = True) -> nn.Module:
    """Convert a ResNet to IBN-b in place (official ``ibn_cfg=('b','b',None,None)``); returns ``model``.

    The stem norm ``model.bn1`` becomes ``InstanceNorm(C, affine=True)``; the last block of
    ``layer1`` and of ``layer2`` (if the stage has more than one block, as the official loop)
    gets ``IN = InstanceNorm(C_out, affine=True)`` after the residual addition, before the final
    ReLU. torchvision ``BasicBlock``/``Bottleneck`` instances get this module's identical forward
    (plus the ``IN`` step) by a class swap; blocks with other submodules raise ``TypeError``.
    ``keep_weights`` copies the stem BatchNorm's affine into the new InstanceNorm.
    """
    stages = _stages(model, "to_ibn_b")
    stem = getattr(model, "bn1", None)
    if stem is None:
        raise TypeError(f"to_ibn_b expects the stem norm at model.bn1, {type(model).__name__} has none")
    if not isinstance(stem, nn.modules.instancenorm._InstanceNorm):
        channels = _out_channels(model, "conv1")
        replace_modules(model, lambda name, m: name == "bn1", lambda name, m: _in_from(m, channels, keep_weights, m))
    for stage in stages[:2]:
        blocks = _blocks(stage)
        if len(blocks) < 2:
            continue
        last = blocks[-1]
        _enable_post_add_in(last)
        if last.IN is None:
            channels = _out_channels(last, "conv3" if hasattr(last, "conv3") else "conv2")
            last.IN = _in_from(None, channels, False, last)
    return model


def make_ibn(model: nn.Module, placement: IBNPlacement = "a", **kwargs: object) -> nn.Module:
    """``to_ibn_a(model, **kwargs)`` or ``to_ibn_b(model, **kwargs)`` by ``placement``; in place, returns ``model``."""
    if placement == "a":
        return to_ibn_a(model, **kwargs)  # type: ignore[arg-type]
    if placement == "b":
        return to_ibn_b(model, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"placement must be 'a' or 'b', got {placement!r}")
