"""Layer specs from config: one dict per layer -> nn.Module, with the output shape by formula."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from siamese.checks import is_number
from siamese.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# type -> (allowed keys, defaults)
LAYER_KEYS: dict[str, dict[str, Any]] = {
    "conv": {
        "out_channels": None,
        "kernel_size": 3,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "bias": True,
    },
    "maxpool": {"kernel_size": 2, "stride": None, "padding": 0, "dilation": 1},
    "avgpool": {"kernel_size": 2, "stride": None, "padding": 0},
    "batchnorm": {},
    "dropout": {"p": 0.1},
    **{name: {} for name in ACTIVATIONS},
}


def check_dropout(p: Any, key: str) -> float:
    """``p`` as a dropout probability, or a ConfigError naming its config ``key``.

    1 is refused although torch takes it: it zeroes every feature, so nothing trains.
    """
    if not is_number(p) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{key} must be in [0, 1), got {p!r}; e.g. {key}=0.3 (0 turns it off)")
    return float(p)


def conv_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """H_out = floor((H_in + 2*padding - dilation*(kernel-1) - 1) / stride + 1)."""
    return math.floor((size + 2 * padding - dilation * (kernel_size - 1) - 1) / stride + 1)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ConfigError(f"expected an int or a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def layer_from_spec(
    spec: Mapping[str, Any], shape: tuple[int, int, int], index: int
) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build layer ``index`` of a tower from its spec; return it and its (C, H, W) output.

    Raises ConfigError naming the layer when the spec is unknown or the image shrinks below 1x1.
    """
    spec = dict(spec)
    kind = str(spec.pop("type", "")).lower()
    if kind not in LAYER_KEYS:
        raise ConfigError(
            f"model.layers[{index}] has type {kind!r}; expected one of {sorted(LAYER_KEYS)}"
        )
    unknown = set(spec) - set(LAYER_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"model.layers[{index}] ({kind}) has unknown keys {sorted(unknown)}; "
            f"allowed: {sorted(LAYER_KEYS[kind])}"
        )
    args = {**LAYER_KEYS[kind], **spec}
    c, h, w = shape

    if kind in ("conv", "maxpool", "avgpool"):
        k = _pair(args["kernel_size"])
        s = _pair(args["stride"] if args["stride"] is not None else args["kernel_size"])
        p = _pair(args["padding"])
        d = _pair(args.get("dilation", 1))
        out_h = conv_output_size(h, k[0], s[0], p[0], d[0])
        out_w = conv_output_size(w, k[1], s[1], p[1], d[1])
        if out_h < 1 or out_w < 1:
            raise ConfigError(
                f"model.layers[{index}] ({kind}, kernel {k}, stride {s}, padding {p}, "
                f"dilation {d}) shrinks the {h}x{w} input to {out_h}x{out_w}; "
                "remove a pooling/conv layer, lower its stride or raise data.image_size"
            )
        if kind == "conv":
            out_c = args["out_channels"]
            if not isinstance(out_c, int) or out_c < 1:
                raise ConfigError(
                    f"model.layers[{index}] (conv) needs out_channels >= 1, got {out_c!r}"
                )
            layer = nn.Conv2d(c, out_c, k, s, p, d, bias=bool(args["bias"]))
            return layer, (out_c, out_h, out_w)
        if kind == "maxpool":
            return nn.MaxPool2d(k, s, p, d), (c, out_h, out_w)
        return nn.AvgPool2d(k, s, p), (c, out_h, out_w)
    if kind == "batchnorm":
        return nn.BatchNorm2d(c), shape
    if kind == "dropout":
        return nn.Dropout2d(check_dropout(args["p"], f"model.layers.{index}.p")), shape
    return ACTIVATIONS[kind](), shape
