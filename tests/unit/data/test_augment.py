"""BatchPhotoAugment against torchvision.transforms.v2 applied image by image, and the
data/augment config group that selects it."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF, compose_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from siamese.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    BatchPhotoAugment,
    BatchRandomAffine,
    PhotoParams,
)
from siamese.errors import ConfigError

# float32 rounding only: grid_sample and interpolate() compute the same source positions
# and weights in a different order (~1e-6 apart), and the blends use a tensor factor where
# v2 uses a scalar alpha (1 ulp). A wrong crop box, flip or op order is off by >1e-2.
ATOL = 2e-5


JITTER = {
    BRIGHTNESS: TF.adjust_brightness,
    CONTRAST: TF.adjust_contrast,
    SATURATION: TF.adjust_saturation,
    HUE: TF.adjust_hue,
}


def per_image_v2(images: torch.Tensor, p: PhotoParams, size: tuple[int, int]) -> torch.Tensor:
    """The same draws applied one image at a time by torchvision.transforms.v2.functional."""
    out = []
    for k, image in enumerate(images):
        box = [int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k])]
        # v2's default antialias=True blurs only a crop shrunk below its size; the batched
        # crop samples bilinearly (documented), which is v2's antialias=False there.
        shrinks = size[0] < box[2] or size[1] < box[3]
        x = TF.resized_crop(image, *box, size=list(size), antialias=not shrinks)
        if p.flip[k]:
            x = TF.hflip(x)
        if p.jitter[k]:
            factors = [p.brightness[k], p.contrast[k], p.saturation[k], p.hue[k]]
            for op in p.order[k].tolist():
                x = JITTER[op](x, float(factors[op]))
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("channels", "size", "hue"),
    [(3, None, 0.5), (1, None, 0.5), (3, (20, 18), 0.5), (3, (7, 6), 0.5), (3, None, 0.0)],
    ids=["rgb", "gray", "rgb-larger", "rgb-smaller", "rgb-no-hue"],
)
def test_matches_v2_functional_applied_per_image(channels, size, hue):
    torch.manual_seed(0)
    aug = BatchPhotoAugment(
        scale=(0.2, 1.0), brightness=0.5, contrast=0.5, saturation=0.5, hue=hue, size=size
    )
    images = torch.rand(24, channels, 14, 12)
    p = aug.params(24, 14, 12, images.device)
    assert p.jitter.any() and not p.jitter.all() and p.flip.any() and not p.flip.all()
    assert len({tuple(row) for row in p.order.tolist()}) > 8  # orders differ per image
    out = aug.apply(images, p)
    assert out.shape == (24, channels, *(size or (14, 12)))
    torch.testing.assert_close(out, per_image_v2(images, p, size or (14, 12)), atol=ATOL, rtol=0)


def test_crop_sizes_are_drawn_as_v2_draws_them():
    # A fixed area and aspect ratio leave v2 one crop size (or its central fallback).
    for scale, ratio, hw in [(0.3, 2.0, (10, 12)), (0.64, 1.0, (20, 20)), (1.0, 3.0, (9, 9))]:
        want = v2.RandomResizedCrop(5, scale=(scale, scale), ratio=(ratio, ratio)).make_params(
            [torch.zeros(1, *hw)]
        )
        aug = BatchPhotoAugment(scale=(scale, scale), ratio=(ratio, ratio))
        p = aug.params(50, *hw, torch.device("cpu"))
        assert set(p.height.tolist()) == {want["height"]}, (scale, ratio)
        assert set(p.width.tolist()) == {want["width"]}, (scale, ratio)
        assert (p.top >= 0).all() and (p.top + p.height <= hw[0]).all()
        assert (p.left >= 0).all() and (p.left + p.width <= hw[1]).all()
    # (1.0, 3.0) never fits a square: v2's central crop, 9 wide and round(9 / 3) high.
    assert set(p.top.tolist()) == {3} and set(p.left.tolist()) == {0}


def test_every_image_gets_its_own_draws():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 16, 16).expand(16, -1, -1, -1)  # one image, 16 times
    out = BatchPhotoAugment()(images)
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16)).min() > 1e-3  # no two alike


def test_draws_come_from_the_global_torch_stream():
    aug, images = BatchPhotoAugment(), torch.rand(8, 3, 10, 10)
    torch.manual_seed(3)
    first = aug(images)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(aug(images), first)
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run's restore repeats them
    assert not torch.equal(aug(images), first)


def test_neutral_settings_return_the_images():
    images = torch.rand(4, 3, 10, 10)
    off = BatchPhotoAugment(scale=(1, 1), ratio=(1, 1), hflip=0, p_jitter=0)
    torch.testing.assert_close(off(images), images, atol=1e-6, rtol=0)
    flip = BatchPhotoAugment(scale=(1, 1), ratio=(1, 1), hflip=1, p_jitter=0)
    torch.testing.assert_close(flip(images), images.flip(-1), atol=1e-6, rtol=0)


def test_gray_images_have_no_saturation_or_hue():
    images = torch.rand(16, 1, 10, 10)
    full = BatchPhotoAugment(saturation=0.9, hue=0.5)
    p = full.params(16, 10, 10, images.device)
    without = BatchPhotoAugment(saturation=0, hue=0).apply(images, p)
    torch.testing.assert_close(full.apply(images, p), without, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": [0.5, 1.5]}, r"data.augment.scale=\[0.5, 1.5\] must be \[a, b\] with 0 < a"),
        ({"scale": [0.9, 0.5]}, r"data.augment.scale=\[0.9, 0.5\] must be"),
        ({"ratio": [0, 1]}, r"data.augment.ratio=\[0, 1\] must be \[a, b\] with 0 < a <= b;"),
        ({"hflip": 2}, r"data.augment.hflip=2 must be in \[0, 1\] \(a probability"),
        ({"brightness": -0.1}, r"data.augment.brightness=-0.1 must be >= 0 \(factors"),
        ({"hue": 0.7}, r"data.augment.hue=0.7 must be in \[0, 0.5\] \(a shift in turns"),
        ({"p_jitter": -1}, r"data.augment.p_jitter=-1 must be in \[0, 1\]"),
        ({"size": 0}, r"data.augment.size=0 must be a positive int or \[height, width\]"),
        ({"size": [8, 8, 3]}, r"data.augment.size=\[8, 8, 3\] must be"),
    ],
)
def test_bad_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        BatchPhotoAugment(**kwargs)
    assert "\n" not in str(err.value) and "e.g." in str(err.value)


def test_refuses_integer_images():
    with pytest.raises(ValueError, match=r"takes float images \(B, 1 or 3, H, W\).*uint8"):
        BatchPhotoAugment()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# Each data config's affine settings as they were inlined before the data/augment group.
DIGITS = {"degrees": 10, "translate": 0.1, "shear": 5, "hflip": 0.0, "padding_mode": "zeros"}


AFFINE = {
    "mnist_subset": DIGITS,
    "mnist": DIGITS,
    "kmnist": DIGITS,
    "fashion_mnist": DIGITS,
    "omniglot": {**DIGITS, "translate": 0.05, "padding_mode": "border"},
    "image_folder": {
        **DIGITS,
        "translate": 0.05,
        "shear": 0,
        "hflip": 0.5,
        "padding_mode": "border",
    },
}


def compose_many(overrides: list[list[str]]) -> list:
    """Several train configs composed in one Hydra context (a context costs as much as a
    composition)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return [compose("train", overrides=o) for o in overrides]


def test_data_configs_keep_their_affine_settings():
    common = {"scale": [0.9, 1.1], "p": 1.0, "elastic_alpha": 0.0, "elastic_sigma": 4.0}
    names = sorted(AFFINE)
    for data, cfg in zip(names, compose_many([[f"data={d}"] for d in names]), strict=True):
        want = {"_target_": "siamese.data.augment.BatchRandomAffine", **common, **AFFINE[data]}
        assert dict(cfg.data.augment) == want, data


def test_data_augment_photo_selects_the_photo_recipe():
    names = ["image_folder", "mnist_subset"]
    overrides = [[f"data={d}", "data/augment=photo", "data.augment.hue=0.2"] for d in names]
    for cfg in compose_many(overrides):
        aug = instantiate(cfg.data.augment)
        assert isinstance(aug, BatchPhotoAugment) and aug.ranges[HUE] == (-0.2, 0.2)


def test_augment_null_and_single_keys_still_override(tmp_path):
    assert compose_train(["data.augment=null"], tmp_path).data.augment is None
    cfg = compose_train(["data=omniglot", "data.augment.degrees=5"], tmp_path)
    aug = instantiate(cfg.data.augment)
    assert isinstance(aug, BatchRandomAffine) and aug.degrees == 5 and aug.translate == 0.05
