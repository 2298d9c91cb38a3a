"""Towers: shapes against the conv formula, build-time errors, and weight sharing."""

from __future__ import annotations

import pytest
import torch
from helpers import LAYERS
from torch import nn

from siamese.errors import ConfigError
from siamese.models import ConvTower, ResNet18Tower, conv_output_size


def formula(h: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize(
    ("h", "k", "s", "p", "d"),
    [(28, 3, 1, 1, 1), (28, 5, 2, 0, 1), (105, 10, 1, 0, 1), (31, 3, 2, 1, 2), (7, 7, 1, 0, 1)],
)
def test_conv_output_size_matches_formula_and_torch(h, k, s, p, d):
    assert conv_output_size(h, k, s, p, d) == formula(h, k, s, p, d)
    out = nn.Conv2d(1, 1, k, s, p, d)(torch.zeros(1, 1, h, h))
    assert out.shape[-1] == formula(h, k, s, p, d)


@pytest.mark.parametrize(("c", "h", "w"), [(1, 28, 28), (3, 64, 48), (1, 105, 105), (3, 33, 17)])
def test_conv_tower_flattened_size_follows_the_formula(c, h, w):
    tower = ConvTower(LAYERS, hidden_dims=[32], embedding_dim=10, in_channels=c, image_size=[h, w])
    # By hand: conv(5, s2, p1) -> maxpool(3, s2) -> conv(3, d2, p2) keeps size -> avgpool(2).
    eh, ew = (formula(formula(formula(x, 5, 2, 1), 3, 2), 2, 2) for x in (h, w))
    assert tower.feature_shape == (16, eh, ew)
    assert tower.head[1].in_features == 16 * eh * ew
    assert tower(torch.rand(4, c, h, w)).shape == (4, 10)


def test_layer_list_that_shrinks_below_one_pixel_fails_naming_the_layer():
    layers = [{"type": "conv", "out_channels": 4, "kernel_size": 3}] + [
        {"type": "maxpool", "kernel_size": 2}
    ] * 5
    # 28 -conv3-> 26 -pool-> 13 -> 6 -> 3 -> 1 -> 0: the fifth pool (layer 5) fails.
    with pytest.raises(
        ConfigError, match=r"model.layers\[5\] \(maxpool.*shrinks the 1x1 input to 0x0"
    ):
        ConvTower(layers, embedding_dim=8, in_channels=1, image_size=28)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "convolution"}, "type 'convolution'"),
        ({"type": "conv", "out_channels": 4, "kernal_size": 3}, "unknown keys \\['kernal_size'\\]"),
        ({"type": "conv"}, "needs out_channels"),
    ],
)
def test_bad_layer_specs_fail_with_a_clear_message(spec, match):
    with pytest.raises(ConfigError, match=match):
        ConvTower([spec], embedding_dim=8, in_channels=1, image_size=28)


@pytest.mark.parametrize("dim", [0, -3])
def test_embedding_dim_must_be_positive(dim):
    with pytest.raises(
        ConfigError, match=f"model.embedding_dim must be a positive integer, got {dim}"
    ):
        ConvTower(LAYERS, embedding_dim=dim, in_channels=1, image_size=28)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_resnet18_tower_any_channels_no_download(channels):
    tower = ResNet18Tower(embedding_dim=12, in_channels=channels, image_size=[28, 28])
    assert tower(torch.rand(2, channels, 28, 28)).shape == (2, 12)
    big = ResNet18Tower(embedding_dim=5, small_input=False, in_channels=channels, image_size=64)
    assert big(torch.rand(2, channels, 64, 64)).shape == (2, 5)


def test_resnet18_dropout_acts_in_training_only():
    torch.manual_seed(0)
    tower = ResNet18Tower(embedding_dim=8, dropout=0.5, in_channels=1, image_size=28)
    x = torch.rand(2, 1, 28, 28)
    tower.train()
    assert not torch.equal(tower(x), tower(x))  # a new dropout mask each call
    tower.eval()
    assert torch.equal(tower(x), tower(x))
    assert isinstance(tower.net.fc[0], torch.nn.Dropout) and tower.net.fc[0].p == 0.5
    assert isinstance(
        ResNet18Tower(embedding_dim=8, in_channels=1, image_size=28).net.fc, torch.nn.Linear
    )
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\), got 1.0"):
        ResNet18Tower(embedding_dim=8, dropout=1.0, in_channels=1, image_size=28)


def test_input_normalisation_is_applied_and_saved():
    tower = ConvTower(
        LAYERS, embedding_dim=4, in_channels=1, image_size=28, input_mean=0.5, input_std=0.25
    )
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(tower.normalize_input(x), torch.ones_like(x))
    assert {"input_mean", "input_std"} <= set(tower.state_dict())
