"""Models: layer specs and the towers that embed images."""

from siamese.models.layers import conv_output_size, layer_from_spec
from siamese.models.towers import ConvTower, ResNet18Tower, Tower

__all__ = ["ConvTower", "ResNet18Tower", "Tower", "conv_output_size", "layer_from_spec"]
