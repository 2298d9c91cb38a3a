"""Input checks of the inference API: images as a model takes them, or one line saying why not."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from siamese.errors import DataError

# Float pixels the inference entry points take: [0, 1], with slack for a resampler's
# overshoot; 0-255 pixels (max 255) and mean/std-normalised images (min about -2) fall outside.
IMAGE_RANGE = (-0.5, 1.5)


def check_images(
    images: Any, shape: Sequence[int], name: str = "images", values: bool = True
) -> Tensor:
    """``images`` as a tensor (B, C, H, W) of ``shape`` (C, H, W), float or uint8, or one
    DataError line saying what was wrong, the value and the fix.

    A numpy array becomes a tensor without a copy. The type, dtype and shape cost a few
    microseconds and read nothing back. With ``values``, float values are checked too, with
    one ``aminmax`` pass and one read-back (a GPU waits for it): NaN, infinity and values
    outside ``IMAGE_RANGE`` are refused. uint8 pixels (0-255) pass; ``SiameseModule``
    divides them by 255 batch by batch.
    """
    c, h, w = (int(v) for v in shape)
    wanted = f"{name} must be a float tensor (B, {c}, {h}, {w}) in [0, 1]"
    from_numpy = isinstance(images, np.ndarray)
    if from_numpy:
        if images.dtype not in (np.uint8, np.float16, np.float32, np.float64):
            raise DataError(
                f"{wanted}; got a numpy array of dtype {images.dtype} (pass floats, or 0-255 "
                "pixels as uint8)"
            )
        with warnings.catch_warnings():  # read-only arrays (np.load mmap): nothing writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise DataError(
            f"{wanted}; got {type(images).__name__} (siamese.read_images(files, like=model) "
            "reads image files)"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DataError(
            f"{wanted}; got dtype {images.dtype} (pass floats, or 0-255 pixels as uint8)"
        )
    got = tuple(images.shape)
    if got[1:] != (c, h, w):  # also any other number of dimensions
        if got == (c, h, w):
            hint = f"; one image needs a batch dimension: pass {name}[None]"
        elif c == 1 and len(got) == 3 and got[1:] == (h, w):
            hint = f"; add the channel dimension: pass {name}[:, None]"
        elif len(got) == 4 and got[1:] == (h, w, c):
            move = "transpose" if from_numpy else "permute"
            hint = f"; the channels come last: pass {name}.{move}(0, 3, 1, 2)"
        elif len(got) == 4:
            hint = " (siamese.read_images(files, like=model) converts and resizes image files)"
        else:
            hint = ""
        raise DataError(f"{wanted}; got shape {got}{hint}")
    if not values or images.dtype == torch.uint8 or images.numel() == 0:
        return images
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(images)).sum())
        raise DataError(f"{wanted}; got {bad} NaN or infinite values")
    if lo < IMAGE_RANGE[0]:
        raise DataError(
            f"{wanted}; got values from {lo:.4g} to {hi:.4g}: pass the pixels before any "
            "mean/std normalisation (the model applies its own)"
        )
    if hi > IMAGE_RANGE[1]:
        raise DataError(
            f"{wanted}; got values up to {hi:.4g}: divide 0-255 pixels by 255, or pass them "
            "as uint8"
        )
    return images
