"""A tower's input as its weights expect it: image size and per-channel statistics.

``input_defaults`` says what the weights a tower config starts from imply (a timm model's
pretrained config, torchvision's ImageNet preset, or a train.py checkpoint's own input
config, via ``checkpoint_input``); ``check_forward`` runs one image through a built tower
so a size the network cannot take fails at build, in one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from siamese.errors import ConfigError
from siamese.models.weights import one_line

if TYPE_CHECKING:
    from siamese.models.towers import Tower


def stats_for(values: Sequence[float], channels: int) -> list[float]:
    """Per-channel statistics of RGB weights for ``channels`` inputs (gray: their mean)."""
    values = [float(v) for v in values]
    if channels == len(values):
        return values
    if channels == 1:
        return [round(sum(values) / len(values), 6)]
    return [values[i % len(values)] for i in range(channels)]


def check_forward(tower: Tower, what: str) -> None:
    """One image through the tower at build, in eval mode: a network that cannot take the
    input size fails here in one line, not at the first training step."""
    was = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            tower(torch.zeros(1, *tower.input_shape))
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = one_line(exc, 160)
        c, h, w = tower.input_shape
        raise ConfigError(
            f"{what} cannot take {c}x{h}x{w} images ({reason}); set model.image_size=[H,W] "
            "to a size it takes (its pretrained size: timm.models.get_pretrained_cfg(name)"
            ".input_size)"
        ) from None
    finally:
        tower.train(was)


def checkpoint_input(weights: Any, channels: int) -> dict[str, Any]:
    """The input config a train.py checkpoint used as ``model.weights`` was trained with
    (image size, mean, std), or {} for any other file: the weights then came from data of
    that size and those statistics, not from ImageNet's."""
    if not weights or str(weights).endswith(".safetensors"):
        return {}
    try:
        data = torch.load(Path(str(weights)).expanduser(), map_location="cpu",
                          weights_only=True, mmap=True)  # fmt: skip
    except Exception:  # not a checkpoint: read_weights says what it is when it reads it
        return {}
    hparams = data.get("hyper_parameters") if isinstance(data, dict) else None
    tower = hparams.get("tower") if isinstance(hparams, dict) else None
    if not isinstance(tower, dict):
        return {}
    found: dict[str, Any] = {}
    size = tower.get("image_size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
        found["image_size"] = size
    mean, std = tower.get("input_mean"), tower.get("input_std")
    if all(isinstance(v, list) and v and all(isinstance(x, float | int) for x in v)
           for v in (mean, std)):  # fmt: skip
        found["input_mean"] = stats_for(mean, channels)
        found["input_std"] = stats_for(std, channels)
    return found


def input_defaults(tower: Mapping[str, Any], channels: int) -> dict[str, Any]:
    """What the weights a tower config starts from say about its input (empty: the data's)."""
    from siamese.registry import tower_class

    defaults = getattr(tower_class(tower), "input_defaults", None)
    return defaults(tower, channels) if defaults is not None else {}
