"""Decoding one image (a file, or an upload's bytes): regular files only, EXIF-upright, any
mode to 'L' or 'RGB'."""

from __future__ import annotations

import io
import os
import stat
import warnings
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


class UndecodableImage(Exception):
    """Raised by ``decode_image``: the file could not be decoded, for ``reason`` (a few words)."""

    @property
    def reason(self) -> str:
        return str(self.args[0])


def decode_image(path: str, image_size: tuple[int, int], channels: int) -> Tensor:
    """One image file as float32 (C, H, W) in [0, 1]: ``channels`` 1 or 3, ``image_size`` (H, W).

    The image is turned upright as its EXIF orientation tag says (phone photos are stored
    sideways with such a tag). A JPEG at least twice the size asked for is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg's draft mode) before resizing, so huge photos cost little.
    Raises UndecodableImage(reason) for anything but a regular file (a FIFO would block the
    reader forever), for any file PIL cannot decode, and for images over PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    try:
        with open_regular(path) as f:
            return _decode(f, image_size, channels, None)
    except UndecodableImage:
        raise
    except Exception as exc:  # a damaged file can make a decoder raise almost anything
        raise UndecodableImage(_reason(exc, path, _is_empty_file(path))) from None


def decode_image_bytes(
    data: bytes, image_size: tuple[int, int], channels: int, max_pixels: int | None = None
) -> Tensor:
    """An image file's bytes (an upload) decoded as ``decode_image`` decodes a file.

    ``max_pixels``: images of more pixels (width x height, read from the header before any
    pixel is decoded) are refused, a decompression-bomb limit below PIL's global one, which
    applies as well and is left as it is."""
    if not data:
        raise UndecodableImage("empty (0 bytes)")
    try:
        return _decode(io.BytesIO(data), image_size, channels, max_pixels)
    except UndecodableImage:
        raise
    except Exception as exc:  # a damaged file can make a decoder raise almost anything
        raise UndecodableImage(_reason(exc)) from None


def _decode(
    f: BinaryIO, image_size: tuple[int, int], channels: int, max_pixels: int | None
) -> Tensor:
    """The shared body of ``decode_image`` and ``decode_image_bytes`` (errors: the callers')."""
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import pil_to_tensor

    mode = "L" if channels == 1 else "RGB"
    h, w = image_size
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those as well.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(f) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise UndecodableImage(
                    f"too large to decode safely: {width} x {height} = {width * height} "
                    f"pixels, over the limit of {max_pixels}"
                )
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            # Draft sizes apply to the stored pixels, which a 90-degree tag turns.
            img.draft(mode, (h, w) if orientation in (5, 6, 7, 8) else (w, h))  # JPEG only
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            img = to_mode(img, mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
    return pil_to_tensor(img).to(torch.float32).div_(255.0)


# EXIF tag 0x0112: how the stored pixels are turned (1 upright, 6 = rotate 90 degrees...).
_EXIF_ORIENTATION = 0x0112


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading, refused (UndecodableImage) unless it is a regular
    file. Opened non-blocking and checked on the open descriptor: a plain open of a FIFO
    waits for a writer forever, and checking the path first would leave a race."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UndecodableImage(f"not a regular file but {special_file_type(mode)}")
        return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for regular files
    except BaseException:
        os.close(fd)
        raise


def special_file_type(mode: int) -> str:
    """What a file that is not regular is, in words, from its ``st_mode``."""
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "a special file"


def _is_empty_file(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _reason(exc: Exception, path: str = "", empty: bool = False) -> str:
    """Why an image (the file at ``path``, or bytes) could not be decoded, in a few words on
    one line; ``empty``: the file holds 0 bytes."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"too large to decode safely: {str(exc).rstrip('.')}"
    if empty:
        return "empty file (0 bytes)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL recognises, or a damaged header"
    if isinstance(exc, OSError) and exc.strerror:  # missing file, permission denied, ...
        return exc.strerror
    text = str(exc)
    if path:
        text = text.replace(repr(path), "").replace(path, "")
    text = " ".join(text.split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# 16/32-bit integer and float modes: scaled to 8 bits by ``_to_uint8``.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def to_mode(img: PILImage, mode: str) -> PILImage:
    """Convert a PIL image to 'L' or 'RGB': deep (16-bit, 32-bit, float) images scaled to 8
    bits, transparency composited on white, CMYK/palette/1-bit/YCbCr through RGB."""
    from PIL import Image

    transparent = img.mode in _ALPHA_MODES or "transparency" in img.info
    if img.mode == mode and not transparent:
        return img
    if img.mode in _DEEP_MODES:
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L")
    elif transparent:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img.convert(mode)


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """A deep single-channel image as uint8. 16-bit (``I;16*``): value / 257. ``I`` and ``F``
    by their range: 0..1 (``F`` only) x 255, 0..255 as is, 0..65535 / 257; any other range
    is stretched from its minimum to its maximum. NaN and infinities become 0."""
    x = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        x = x / 257.0
    elif lo < 0 or hi > 65535:
        x = (x - lo) * (255.0 / (hi - lo))
    elif mode == "F" and hi <= 1:
        x = x * 255.0
    elif hi > 255:
        x = x / 257.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
