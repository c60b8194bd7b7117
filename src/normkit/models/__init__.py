"""Reference models and model conversions: ResNet + IBN-Net, self-normalizing MLPs, NF-ResNets."""

from normkit.models.nf_resnet import NFBlock, NFResNet, nf_expected_stds, nf_output_std, nf_stages
from normkit.models.resnet import BasicBlock, Bottleneck, ResNet, make_ibn, resnet, to_ibn_a, to_ibn_b
from normkit.models.self_normalizing import (
    LayerMoments,
    activation_moments,
    self_normalizing_mlp,
    selu_fixed_point,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "LayerMoments",
    "NFBlock",
    "NFResNet",
    "ResNet",
    "activation_moments",
    "make_ibn",
    "nf_expected_stds",
    "nf_output_std",
    "nf_stages",
    "resnet",
    "self_normalizing_mlp",
    "selu_fixed_point",
    "to_ibn_a",
    "to_ibn_b",
]
