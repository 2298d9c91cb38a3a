"""Towers: the weight-shared networks that map images (B, C, H, W) to embeddings (B, D)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from siamese.checks import check_int_setting
from siamese.errors import ConfigError
from siamese.models.layers import ACTIVATIONS, check_dropout, layer_from_spec


def _image_size(value: int | Sequence[int] | None) -> tuple[int, int]:
    if value is None:
        raise ConfigError(
            "model.image_size is not set; it comes from the data module (set data.image_size "
            "or model.image_size=[H,W])"
        )
    if isinstance(value, int):
        return value, value
    h, w = (int(v) for v in value)
    return h, w


def check_tower_settings(model_cfg: Mapping[str, Any], resuming: bool = False) -> None:
    """Check the tower arguments that need no image shape (dropout probabilities, a timm
    name, a weights file, the backbone's learning-rate multiplier), so that train.py refuses
    them at start: the tower itself is built after the data is read."""
    if model_cfg.get("dropout") is not None:
        check_dropout(model_cfg["dropout"], "model.dropout")
    from siamese.models.backbones import check_backbone_settings  # built on this module

    check_backbone_settings(model_cfg, resuming)
    for index, spec in enumerate(model_cfg.get("layers") or []):
        if isinstance(spec, Mapping) and str(spec.get("type", "")).lower() == "dropout":
            check_dropout(spec.get("p", 0.1), f"model.layers.{index}.p")


class Tower(nn.Module):
    """Base tower: normalises the input with fixed per-channel statistics, then embeds it.

    Inputs are float images in [0, 1]; the statistics travel in the checkpoint, so a loaded
    model needs no knowledge of the data module.
    """

    def __init__(
        self,
        embedding_dim: int,
        in_channels: int | None,
        image_size: int | Sequence[int] | None,
        input_mean: float | Sequence[float] | None,
        input_std: float | Sequence[float] | None,
    ) -> None:
        super().__init__()
        check_int_setting("model.embedding_dim", embedding_dim)
        if in_channels is None or int(in_channels) < 1:
            raise ConfigError(
                f"model.in_channels must be >= 1, got {in_channels!r}; it comes from the data"
            )
        self.embedding_dim = embedding_dim
        self.in_channels = int(in_channels)
        self.image_size = _image_size(image_size)
        mean = torch.as_tensor(0.0 if input_mean is None else input_mean, dtype=torch.float32)
        std = torch.as_tensor(1.0 if input_std is None else input_std, dtype=torch.float32)
        if (std <= 0).any():
            raise ConfigError(f"model.input_std must be positive, got {input_std!r}")
        self.register_buffer("input_mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("input_std", std.reshape(1, -1, 1, 1).clone())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.in_channels, *self.image_size

    def normalize_input(self, x: Tensor) -> Tensor:
        return (x - self.input_mean) / self.input_std


class ConvTower(Tower):
    """Conv/pool/batch-norm/activation layers from a config list, then Linear layers to D.

    The flattened size before the first Linear follows from the conv output formula, so any
    input size and layer list works; a list that shrinks the image below 1x1 fails at build.
    ``output_activation`` (None: the last Linear's output as is) squashes the embedding, e.g.
    ``sigmoid`` for Koch et al. 2015's 4096-unit embedding.
    """

    def __init__(
        self,
        layers: Sequence[Mapping[str, Any]],
        hidden_dims: Sequence[int] = (),
        embedding_dim: int = 64,
        activation: str = "relu",
        dropout: float = 0.0,
        output_activation: str | None = None,
        in_channels: int | None = None,
        image_size: int | Sequence[int] | None = None,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__(embedding_dim, in_channels, image_size, input_mean, input_std)
        dropout = check_dropout(dropout, "model.dropout")
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation {activation!r} is unknown; expected one of {sorted(ACTIVATIONS)}"
            )
        if output_activation is not None and output_activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.output_activation {output_activation!r} is unknown; expected null or "
                f"one of {sorted(ACTIVATIONS)}"
            )
        shape = self.input_shape
        modules: list[nn.Module] = []
        for index, spec in enumerate(layers):
            layer, shape = layer_from_spec(spec, shape, index)
            modules.append(layer)
        self.features = nn.Sequential(*modules)
        self.feature_shape = shape
        flat = shape[0] * shape[1] * shape[2]
        head: list[nn.Module] = [nn.Flatten()]
        width = flat
        for hidden in hidden_dims:
            if int(hidden) < 1:
                raise ConfigError(f"model.hidden_dims must be positive, got {list(hidden_dims)}")
            head += [nn.Linear(width, int(hidden)), ACTIVATIONS[activation]()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            width = int(hidden)
        head.append(nn.Linear(width, embedding_dim))
        if output_activation is not None:
            head.append(ACTIVATIONS[output_activation]())
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.normalize_input(x)))  # (B, D)
