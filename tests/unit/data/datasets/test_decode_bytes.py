"""decode_image_bytes: an upload's bytes decoded exactly as decode_image decodes the file,
with a pixel limit read from the header before any pixel is decoded."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from helpers import MIXED, save_image
from PIL import Image

from siamese.data.datasets import UndecodableImage, decode_image, decode_image_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels and that holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("name", "mode", "size"), MIXED)
@pytest.mark.parametrize("channels", [1, 3])
def test_bytes_decode_to_the_same_tensor_as_the_file(tmp_path, name, mode, size, channels):
    path = tmp_path / name
    save_image(path, mode, size, seed=3)
    expected = decode_image(str(path), (10, 7), channels)
    got = decode_image_bytes(path.read_bytes(), (10, 7), channels)
    assert got.shape == (channels, 10, 7) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_an_exif_turned_jpeg_is_turned_upright_from_bytes_too(tmp_path):
    stored = Image.new("RGB", (16, 8), (0, 0, 255))
    stored.paste(Image.new("RGB", (8, 8), (255, 0, 0)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)
    image = decode_image_bytes(path.read_bytes(), (16, 8), 3)
    assert torch.equal(image, decode_image(str(path), (16, 8), 3))
    assert image[0, :6].mean() > 0.8 and image[2, 10:].mean() > 0.8  # red on top, blue below


def test_the_pixel_limit_is_read_from_the_header_before_decoding():
    # 5000 x 5000 claimed, no pixel data at all: only the header was read.
    with pytest.raises(UndecodableImage) as refused:
        decode_image_bytes(png_header_only(5000, 5000), (8, 8), 1, max_pixels=1_000_000)
    assert refused.value.reason == (
        "too large to decode safely: 5000 x 5000 = 25000000 pixels, over the limit of 1000000"
    )


def test_an_image_of_exactly_the_pixel_limit_is_decoded(tmp_path):
    path = tmp_path / "a.png"
    save_image(path, "L", (30, 20))
    assert decode_image_bytes(path.read_bytes(), (4, 4), 1, max_pixels=600).shape == (1, 4, 4)
    with pytest.raises(UndecodableImage, match="30 x 20 = 600 pixels, over the limit of 599"):
        decode_image_bytes(path.read_bytes(), (4, 4), 1, max_pixels=599)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty (0 bytes)"),
        (b"hello, not an image", "not an image format PIL recognises, or a damaged header"),
    ],
)
def test_empty_or_foreign_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(UndecodableImage) as refused:
        decode_image_bytes(data, (8, 8), 1)
    assert refused.value.reason == reason


def test_a_truncated_image_is_refused_with_the_decoders_reason(tmp_path):
    path = tmp_path / "a.png"
    save_image(path, "RGB", (64, 64))
    with pytest.raises(UndecodableImage) as refused:
        decode_image_bytes(path.read_bytes()[:200], (8, 8), 3)
    assert refused.value.reason == "OSError: image file is truncated"
