"""Models: layer specs, the towers that embed images, and pretrained backbones."""

from siamese.models.backbones import BackboneTower, ResNet18Tower, TimmTower
from siamese.models.layers import conv_output_size, layer_from_spec
from siamese.models.towers import ConvTower, Tower

__all__ = [
    "BackboneTower",
    "ConvTower",
    "ResNet18Tower",
    "TimmTower",
    "Tower",
    "conv_output_size",
    "layer_from_spec",
]
