"""The inference API: load a checkpoint alone, embed, compare and same, with one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_fragments, tiny_model

import siamese
from siamese.errors import ConfigError, DataError


def test_load_refuses_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        siamese.load(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    with pytest.raises(ConfigError) as err:
        siamese.load(truncated)
    assert_fragments(
        str(err.value),
        f"ckpt_path={str(truncated)!r} is not a readable checkpoint (24 bytes;",
        "truncated or damaged",
        "pass a .ckpt file written by train.py",
    )


WANTED = "images must be a float tensor (B, 1, 6, 6) in [0, 1]; got"


READ_IMAGES = "(siamese.read_images(files, like=model) converts and resizes image files)"


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 3, 6, 6), f"shape (2, 3, 6, 6) {READ_IMAGES}"),
        (torch.rand(2, 1, 28, 28), f"shape (2, 1, 28, 28) {READ_IMAGES}"),
        (
            torch.rand(1, 6, 6),
            "shape (1, 6, 6); one image needs a batch dimension: pass images[None]",
        ),
        (torch.rand(5, 6, 6), "shape (5, 6, 6); add the channel dimension: pass images[:, None]"),
        (
            torch.rand(2, 6, 6, 1),
            "shape (2, 6, 6, 1); the channels come last: pass images.permute(0, 3, 1, 2)",
        ),
        (
            np.random.rand(2, 6, 6, 1),
            "shape (2, 6, 6, 1); the channels come last: pass images.transpose(0, 3, 1, 2)",
        ),
        (torch.rand(6, 6), "shape (6, 6)"),
        (
            torch.ones(2, 1, 6, 6, dtype=torch.int64),
            "dtype torch.int64 (pass floats, or 0-255 pixels as uint8)",
        ),
        (
            np.ones((2, 1, 6, 6), dtype=np.int32),
            "a numpy array of dtype int32 (pass floats, or 0-255 pixels as uint8)",
        ),
        ([[0.5] * 6] * 6, "list (siamese.read_images(files, like=model) reads image files)"),
        (
            torch.full((2, 1, 6, 6), 255.0),
            "values up to 255: divide 0-255 pixels by 255, or pass them as uint8",
        ),
        (
            (torch.linspace(0, 1, 72).reshape(2, 1, 6, 6) - 0.5) / 0.25,
            "values from -2 to 2: pass the pixels before any mean/std normalisation (the model "
            "applies its own)",
        ),
        (
            torch.full((2, 1, 6, 6), 0.5).index_fill_(0, torch.tensor([1]), math.nan),
            "36 NaN or infinite values",
        ),
    ],
)
def test_embed_refuses_bad_images_with_one_line(images, message):
    with pytest.raises(DataError) as err:
        tiny_model().embed(images)
    assert str(err.value) == f"{WANTED} {message}"


def test_the_api_takes_uint8_numpy_and_any_float_dtype_as_documented():
    model = tiny_model()
    pixels = torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8)
    floats = pixels.float() / 255
    expected = model.embed(floats)
    assert expected.shape == (5, 4) and expected.dtype == torch.float32
    assert torch.equal(model.embed(pixels), expected)  # uint8: divided by 255 here
    assert torch.equal(model.embed(floats.numpy()), expected)  # numpy: taken as is
    assert torch.equal(model.embed(pixels.numpy()), expected)
    assert torch.equal(model.embed(floats.double()), expected)  # cast to the model's dtype
    torch.testing.assert_close(model.embed(floats, batch_size=2), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.equal(model(pixels), expected)
    # Resampling may overshoot [0, 1] a little: the slack is [-0.5, 1.5].
    assert model.embed(floats * 1.5 - 0.25).shape == (5, 4)
    assert model.embed(torch.zeros(0, 1, 6, 6)).shape == (0, 4)
    # One image against several: each pair (a[0], b[i]).
    dist = model.compare(floats[:1], floats)
    pairs = model.compare(floats[:1].expand(5, -1, -1, -1), floats)
    torch.testing.assert_close(dist, pairs, atol=1e-6, rtol=0)
    assert float(dist[0]) == pytest.approx(0.0, abs=1e-3)


def test_model_call_checks_shapes_but_not_values():
    """``model(images)`` reads nothing back per call (a training loop of one's own): its
    values are embed's to check; the type, dtype and shape cost nothing and are checked."""
    model = tiny_model()
    with torch.no_grad():
        assert model(torch.full((2, 1, 6, 6), 255.0)).shape == (2, 4)
    with pytest.raises(DataError) as err:
        model(torch.rand(2, 3, 6, 6))
    assert str(err.value) == f"{WANTED} shape (2, 3, 6, 6) {READ_IMAGES}"


def test_compare_and_same_refuse_bad_input_with_one_line():
    model = tiny_model()
    a, b = torch.rand(3, 1, 6, 6), torch.rand(2, 1, 6, 6)
    with pytest.raises(DataError) as err:
        model.compare(a, b)
    assert_fragments(
        str(err.value),
        "a and b must hold the same number of images",
        "or one of them a single image",
        "got 3 and 2",
    )
    with pytest.raises(DataError) as err:
        model.compare(a, b.squeeze(1))
    assert_fragments(
        str(err.value),
        "b must be a float tensor (B, 1, 6, 6)",
        "got shape (2, 6, 6)",
        "pass b[:, None]",
    )
    with pytest.raises(ConfigError) as err:
        model.same(a, a)
    assert_fragments(
        str(err.value),
        "this model has no calibrated threshold",
        "run evaluate.py ckpt_path=<this checkpoint> and load the model.ckpt it writes",
        "compare(a, b)",
    )
    model.threshold.fill_(0.5)
    assert torch.equal(model.same(a, a), torch.ones(3, dtype=torch.bool))
    with pytest.raises(DataError) as err:
        model.same(torch.full((3, 1, 6, 6), 2.0), a)
    assert_fragments(
        str(err.value),
        "a must be a float tensor (B, 1, 6, 6) in [0, 1]",
        "got values up to 2",
        "divide 0-255 pixels by 255, or pass them as uint8",
    )
    with pytest.raises(ConfigError) as err:
        model.embed(a, batch_size=0)
    assert str(err.value) == "batch_size must be a positive integer, got 0"


def test_read_images_names_an_unreadable_file_and_what_to_do(tmp_path):
    from helpers import save_image

    save_image(tmp_path / "photos" / "good.png", "L", (8, 8))
    (tmp_path / "photos" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "photos" / "empty.png").write_bytes(b"")
    model = tiny_model()
    with pytest.raises(DataError) as err:
        siamese.read_images(tmp_path / "photos", like=model)
    bad = tmp_path / "photos" / "bad.png"
    assert_fragments(
        str(err.value),
        f"cannot read image {str(bad)!r}",
        "(and 1 more of the 3 files)",
        "fix or remove it",
    )
    empty = tmp_path / "photos" / "empty.png"
    with pytest.raises(DataError) as err:
        siamese.read_images([empty], like=model)
    assert_fragments(
        str(err.value),
        f"cannot read image {str(empty)!r} (empty file (0 bytes))",
        "fix or remove it",
    )
    images, paths = siamese.read_images([tmp_path / "photos" / "good.png"], like=model)
    assert images.shape == (1, 1, 6, 6) and paths == [str(tmp_path / "photos" / "good.png")]
    assert model.embed(images).shape == (1, 4)
