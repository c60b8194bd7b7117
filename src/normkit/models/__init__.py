"""Reference models and model conversions: ResNet + IBN-Net, self-normalizing MLPs, NF-ResNets,
the deep linear BN MLP of Meterez et al. and MIP hypernetworks."""

from normkit.models.bn_mlp import BatchScaleNorm, bn_mlp
from normkit.models.hypernet import HyperNet, encode_input
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
    "BatchScaleNorm",
    "Bottleneck",
    "HyperNet",
    "LayerMoments",
    "NFBlock",
    "NFResNet",
    "ResNet",
    "activation_moments",
    "bn_mlp",
    "encode_input",
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
