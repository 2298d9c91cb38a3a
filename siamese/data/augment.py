"""Batch-wise augmentation on tensors, on device: a random affine (and elastic) warp per
image (``BatchRandomAffine``), or torchvision's photo recipe of random resized crop,
horizontal flip and colour jitter with each image's own draws (``BatchPhotoAugment``).

Applied by the data module after the batch reaches the device, for training only; tensor
data never goes through per-item PIL transforms. Both draw from the global torch stream of
the batch's device, so a resumed run's restored random state repeats them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese.checks import image_size, is_image_size, is_number
from siamese.errors import ConfigError


def _check_range(
    name: str, value: object, low: float, high: float | None, hint: str, open_high: bool = False
) -> None:
    """Refuse ``data.augment.<name>`` outside [low, high] (None: no upper bound)."""
    top = math.inf if high is None else high
    inside = is_number(value) and low <= value and (value < top if open_high else value <= top)
    if not inside:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"data.augment.{name}={value!r} must be {bounds} ({hint})")


class BatchRandomAffine(nn.Module):
    """Random rotation, translation, scale and shear per image, an optional h-flip, and an
    optional elastic distortion (Simard et al. 2003), all in one ``grid_sample``.

    Args:
        degrees: rotation drawn from [-degrees, degrees].
        translate: shift as a fraction of the image size, drawn from [-translate, translate].
        scale: zoom factor range (low, high).
        shear: shear angle in degrees drawn from [-shear, shear].
        hflip: probability of a horizontal flip (0 for digits, 0.5 for most photos).
        p: probability that an image is warped at all.
        padding_mode: "zeros", "border" or "reflection" for pixels warped in from outside.
        elastic_alpha: largest elastic displacement in pixels (0 turns it off).
        elastic_sigma: smoothness of the elastic field in pixels (Gaussian std).
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: Sequence[float] = (0.9, 1.1),
        shear: float = 0.0,
        hflip: float = 0.0,
        p: float = 1.0,
        padding_mode: str = "zeros",
        elastic_alpha: float = 0.0,
        elastic_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        # Checked here, not only by train.py, so that the Python API refuses them too: a
        # negative range or a probability above 1 would otherwise warp silently.
        _check_range("degrees", degrees, 0, None, "degrees, e.g. 10; 0 turns rotation off")
        _check_range("translate", translate, 0, 1, "a fraction of the image size, e.g. 0.1")
        # tan(shear) is infinite at 90 degrees.
        _check_range("shear", shear, 0, 90, "degrees, e.g. 5; 0 turns it off", open_high=True)
        _check_range("hflip", hflip, 0, 1, "a probability, e.g. 0.5; 0 for digits")
        _check_range("p", p, 0, 1, "a probability, e.g. 1.0: every image warped")
        if (
            isinstance(scale, str)
            or not isinstance(scale, Sequence)
            or len(scale) != 2
            or not all(is_number(s) for s in scale)
            or not 0 < scale[0] <= scale[1]
        ):
            raise ConfigError(
                f"data.augment.scale must be [low, high] with 0 < low <= high, got {scale}; "
                "e.g. data.augment.scale=[0.9,1.1]"
            )
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ConfigError(
                f"data.augment.padding_mode={padding_mode!r}; expected zeros, border or reflection"
            )
        _check_range("elastic_alpha", elastic_alpha, 0, None, "pixels, e.g. 2.0; 0 turns it off")
        if not is_number(elastic_sigma) or not elastic_sigma > 0:
            raise ConfigError(
                f"data.augment.elastic_sigma={elastic_sigma!r} must be a positive number of "
                "pixels, e.g. 4.0"
            )
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.shear = float(shear)
        self.hflip = float(hflip)
        self.p = float(p)
        self.padding_mode = padding_mode
        self.elastic_alpha = float(elastic_alpha)
        self.elastic_sigma = float(elastic_sigma)

    def matrices(self, batch: int, device: torch.device) -> Tensor:
        """(B, 2, 3) inverse warps for ``F.affine_grid`` (identity for unaugmented images)."""

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(batch, device=device) * (high - low) + low

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        shear = uniform(-self.shear, self.shear) * (math.pi / 180)
        zoom = uniform(*self.scale)
        tx, ty = uniform(-self.translate, self.translate), uniform(-self.translate, self.translate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        flip = torch.where(torch.rand(batch, device=device) < self.hflip, -1.0, 1.0)
        # Output pixel -> input pixel: rotate+shear, divide by zoom, shift (grid units: [-1, 1]).
        theta = torch.stack(
            [
                torch.stack([flip * cos / zoom, (-sin + torch.tan(shear) * cos) / zoom, 2 * tx], 1),
                torch.stack([flip * sin / zoom, (cos + torch.tan(shear) * sin) / zoom, 2 * ty], 1),
            ],
            1,
        )
        keep = torch.rand(batch, device=device) >= self.p
        # Made on the device (torch.tensor(data, device=...) would copy from the host).
        identity = torch.eye(2, 3, device=device)
        return torch.where(keep.view(-1, 1, 1), identity, theta)

    def elastic_field(self, batch: int, height: int, width: int, device: torch.device) -> Tensor:
        """(B, H, W, 2) smooth random displacements in grid units ([-1, 1] spans the image)."""
        radius = max(1, round(2 * self.elastic_sigma))
        x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / self.elastic_sigma) ** 2)
        kernel = kernel / kernel.sum()
        noise = torch.rand(batch * 2, 1, height, width, device=device) * 2 - 1
        # Separable Gaussian blur; normalised so the largest displacement is about alpha.
        noise = F.conv2d(
            F.pad(noise, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1)
        )
        noise = F.conv2d(
            F.pad(noise, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1)
        )
        noise = noise / noise.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        field = noise.view(batch, 2, height, width).permute(0, 2, 3, 1) * self.elastic_alpha
        # Pixels to grid units, x then y, without a host-to-device copy of the two factors.
        return torch.stack((field[..., 0] * (2.0 / width), field[..., 1] * (2.0 / height)), -1)

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        theta = self.matrices(b, images.device).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        if self.elastic_alpha > 0:
            grid = grid + self.elastic_field(b, h, w, images.device).to(grid.dtype)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False
        )


def _check_pair(name: str, value: object, low: float, high: float | None, example: str) -> None:
    """Refuse ``data.augment.<name>`` that is not [a, b] with low < a <= b (<= high)."""
    ok = (
        not isinstance(value, str)
        and isinstance(value, Sequence)
        and len(value) == 2
        and all(is_number(v) for v in value)
        and low < value[0] <= value[1]
        and (high is None or value[1] <= high)
    )
    if not ok:
        top = "" if high is None else f" <= {high}"
        raise ConfigError(
            f"data.augment.{name}={value!r} must be [a, b] with {low} < a <= b{top}; "
            f"e.g. data.augment.{name}={example}"
        )


# Colour jitter ops, numbered as torchvision's ColorJitter numbers them (its fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class PhotoParams:
    """The draws of ``BatchPhotoAugment`` for one batch: each image's own, all on its device.

    ``top``, ``left``, ``height``, ``width``: (B,) int64, the crop box in input pixels.
    ``flip``, ``jitter``: (B,) bool, whether the image is mirrored, colour-jittered.
    ``order``: (B, 4) int64, each row the order of the jitter ops (``BRIGHTNESS`` ... ``HUE``).
    ``brightness``, ``contrast``, ``saturation``, ``hue``: (B,) factors in torchvision's
    ``adjust_*`` meaning (1, 1, 1, 0 leave an image as it is).
    """

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor
    jitter: Tensor
    order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor


class BatchPhotoAugment(nn.Module):
    """torchvision's photo recipe, ``v2.RandomResizedCrop``, ``v2.RandomHorizontalFlip`` and
    ``v2.RandomApply([v2.ColorJitter], p_jitter)``, on a (B, C, H, W) batch with each image's
    own random parameters (a v2 transform called on a batch draws one set for all of it).

    The parameters are drawn as v2 draws them (10 tries at a crop of area ``scale`` x H x W
    and aspect ``ratio``, else the central crop; jitter ops in a random order per image) and
    applied in a few batched ops: the crop and its bilinear resize (as ``v2.functional.
    resized_crop``) and the flip in one ``grid_sample``, the jitter as per-image blends as in
    ``v2.functional.adjust_*``. Gray (1-channel) images have no colour: saturation and hue
    leave them unchanged, as in torchvision.

    Args:
        scale: range of the crop's area, as a fraction of the image's, e.g. [0.5, 1.0].
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
        hflip: probability of a horizontal flip.
        brightness: brightness factor drawn from [max(0, 1 - brightness), 1 + brightness].
        contrast: contrast factor drawn from [max(0, 1 - contrast), 1 + contrast].
        saturation: saturation factor drawn from [max(0, 1 - saturation), 1 + saturation].
        hue: hue shift drawn from [-hue, hue], in turns of the colour wheel (at most 0.5).
        p_jitter: probability that an image is colour-jittered at all.
        size: output size, an int (square) or [height, width]; null: the input's size. A
            crop larger than ``size`` is sampled bilinearly without antialiasing (v2's
            ``antialias=False``): to shrink large photos, set ``data.image_size`` instead.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        p_jitter: float = 0.8,
        size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_pair("scale", scale, 0, 1, "[0.5,1.0] (fractions of the image's area)")
        _check_pair("ratio", ratio, 0, None, "[0.75,1.3333] (width / height)")
        _check_range("hflip", hflip, 0, 1, "a probability, e.g. 0.5")
        for name, value in (("brightness", brightness), ("contrast", contrast)):
            _check_range(name, value, 0, None, f"factors from 1-{name} to 1+{name}, e.g. 0.4")
        _check_range("saturation", saturation, 0, None, "factors 1 +- saturation, e.g. 0.4")
        _check_range("hue", hue, 0, 0.5, "a shift in turns of the colour wheel, e.g. 0.1")
        _check_range("p_jitter", p_jitter, 0, 1, "a probability, e.g. 0.8; 0 turns jitter off")
        if size is not None and not is_image_size(size):
            raise ConfigError(
                f"data.augment.size={size!r} must be a positive int or [height, width], or "
                "null for the input's size; e.g. data.augment.size=64"
            )
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.p_jitter = float(p_jitter)
        self.size = None if size is None else image_size("data.augment.size", size)
        # v2.ColorJitter's ranges; None where an op can only leave images as they are.
        factors = {BRIGHTNESS: brightness, CONTRAST: contrast, SATURATION: saturation}
        self.ranges: dict[int, tuple[float, float] | None] = {
            op: (max(0.0, 1.0 - x), 1.0 + x) if x else None for op, x in factors.items()
        }
        self.ranges[HUE] = (-float(hue), float(hue)) if hue else None

    def extra_repr(self) -> str:
        ranges = {
            ("brightness", "contrast", "saturation", "hue")[k]: r for k, r in self.ranges.items()
        }
        return (
            f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"p_jitter={self.p_jitter}, size={self.size}, jitter={ranges}"
        )

    def params(self, batch: int, height: int, width: int, device: torch.device) -> PhotoParams:
        """Each image's crop box, flip and jitter, drawn on ``device`` (no host copy)."""

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return torch.rand(batch, *shape, device=device) * (high - low) + low

        # v2.RandomResizedCrop: up to 10 tries of an area and a log-uniform aspect ratio; the
        # first that fits is the crop. All 10 are drawn for every image (a fixed count keeps
        # the random stream independent of the outcome).
        tries = 10
        area = height * width * uniform(*self.scale, tries)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), tries))
        crop_w = torch.round(torch.sqrt(area * aspect))
        crop_h = torch.round(torch.sqrt(area / aspect))
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 if none)
        found = fits.any(1)
        # v2's fallback: the central crop with the aspect ratio clamped into ``ratio``.
        fall_h, fall_w = height, width
        if width / height < self.ratio[0]:
            fall_h = round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            fall_w = round(height * self.ratio[1])
        crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), fall_h).long()
        crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), fall_w).long()
        # randint(0, n - size + 1): floor of a uniform, kept below the top end against rounding.
        top = (torch.rand(batch, device=device) * (height - crop_h + 1)).long()
        left = (torch.rand(batch, device=device) * (width - crop_w + 1)).long()
        top = torch.where(found, torch.minimum(top, height - crop_h), (height - fall_h) // 2)
        left = torch.where(found, torch.minimum(left, width - crop_w), (width - fall_w) // 2)

        flip = torch.rand(batch, device=device) < self.hflip
        jitter = torch.rand(batch, device=device) < self.p_jitter
        order = torch.rand(batch, 4, device=device).argsort(1)  # v2: torch.randperm(4)
        neutral = {BRIGHTNESS: 1.0, CONTRAST: 1.0, SATURATION: 1.0, HUE: 0.0}
        factors = {
            op: torch.full((batch,), neutral[op], device=device) if r is None else uniform(*r)
            for op, r in self.ranges.items()
        }
        return PhotoParams(
            top,
            left,
            crop_h,
            crop_w,
            flip,
            jitter,
            order,
            factors[BRIGHTNESS],
            factors[CONTRAST],
            factors[SATURATION],
            factors[HUE],
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
            raise ValueError(
                f"BatchPhotoAugment takes float images (B, 1 or 3, H, W) in [0, 1], got "
                f"{images.dtype} {tuple(images.shape)}; use data.augment=null for other data"
            )
        b, _, h, w = images.shape
        return self.apply(images, self.params(b, h, w, images.device))

    def apply(self, images: Tensor, p: PhotoParams) -> Tensor:
        """``images`` cropped, resized, flipped and jittered with the draws ``p``."""
        return self._jitter(self._crop_flip(images, p), p)

    def _crop_flip(self, images: Tensor, p: PhotoParams) -> Tensor:
        b, _, h, w = images.shape
        out_h, out_w = self.size or (h, w)

        def axis(n_out: int, n_in: int, start: Tensor, length: Tensor) -> Tensor:
            """(B, n_out) sampling positions in grid units ([-1, 1] spans the input)."""
            # Output pixel centres in [0, 1) of the crop, then into the input (align_corners
            # False, as v2's resize): the same source positions as interpolate() computes.
            dst = (torch.arange(n_out, device=images.device, dtype=images.dtype) + 0.5) / n_out
            start = start.to(images.dtype).unsqueeze(1)
            length = length.to(images.dtype).unsqueeze(1)
            src = start + dst * length  # input pixel units, pixel centres at i + 0.5
            # resize() of the cropped image repeats the crop's edge pixels; it never blends in
            # the pixels just outside the crop, which grid_sample on the whole image would.
            src = torch.minimum(torch.maximum(src, start + 0.5), start + length - 0.5)
            return src * (2.0 / n_in) - 1

        gx = axis(out_w, w, p.left, p.width)
        gx = torch.where(p.flip.unsqueeze(1), gx.flip(1), gx)  # the resized crop, mirrored
        gy = axis(out_h, h, p.top, p.height)
        grid = torch.stack(
            (gx.unsqueeze(1).expand(b, out_h, out_w), gy.unsqueeze(2).expand(b, out_h, out_w)), -1
        )
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _jitter(self, images: Tensor, p: PhotoParams) -> Tensor:
        rgb = images.shape[1] == 3
        # Gray images have no saturation or hue (torchvision leaves them as they are).
        cheap = {
            op: factor.view(-1, 1, 1, 1).to(images.dtype)
            for op, factor in (
                (BRIGHTNESS, p.brightness),
                (CONTRAST, p.contrast),
                (SATURATION, p.saturation),
            )
            if self.ranges[op] is not None and (rgb or op != SATURATION)
        }
        hue = rgb and self.ranges[HUE] is not None
        if not (cheap or hue) or self.p_jitter == 0:
            return images
        # Brightness, contrast and saturation are each a blend of the image with something
        # (black, its mean gray, its gray): step s blends each image with what the op at
        # place s of its own order asks, in one pass over the batch. Hue, the costly one,
        # runs once, between the steps before and after its place in each image's order.
        hue_at = (p.order == HUE).int().argmax(1)  # (B,)
        if not hue:
            hue_at = torch.full_like(hue_at, 4)  # every step comes before it

        def steps(out: Tensor, after_hue: bool) -> Tensor:
            for step in range(1, 4) if after_hue else range(3 if hue else 4):
                here = (step > hue_at) if after_hue else (step < hue_at)
                which = torch.where(here, p.order[:, step], -1).view(-1, 1, 1, 1)
                ratio = torch.ones_like(which, dtype=out.dtype)  # 1: the image as it is
                for op, factor in cheap.items():
                    ratio = torch.where(which == op, factor, ratio)
                gray = _grayscale(out) if rgb else out
                other = torch.where(which == SATURATION, gray, 0.0)
                mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
                other = torch.where(which == CONTRAST, mean, other)
                out = _blend(out, other, ratio)
            return out

        out = steps(images, after_hue=False)
        if hue:
            out = steps(_hue(out, p.hue.view(-1, 1, 1, 1).to(out.dtype)), after_hue=True)
        return torch.where(p.jitter.view(-1, 1, 1, 1), out, images)


# v2.functional's colour kernels with a per-image factor (B, 1, 1, 1) in place of a float:
# adjust_brightness is _blend with black, adjust_contrast with the mean gray,
# adjust_saturation with the gray image.
def _blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    return (image * ratio + other * (1.0 - ratio)).clamp_(0, 1)


def _grayscale(image: Tensor) -> Tensor:
    """(B, 1, H, W) luma with v2's weights (rgb_to_grayscale)."""
    r, g, b = image.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _hue(image: Tensor, shift: Tensor) -> Tensor:
    """v2's adjust_hue (RGB -> HSV, rotate H, back) with a per-image shift."""
    r, g, _ = image.unbind(1)
    minc, maxc = torch.aminmax(image, dim=1)
    eqc = maxc == minc  # gray pixels: no hue, and no division by zero
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(1)
    rc, gc, bc = ((maxc.unsqueeze(1) - image) / divisor).unbind(1)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub(gc).mul_(~maxc_neq_r)
    hb = gc.add(4.0).sub_(rc).mul_(maxc_neq_r & ~maxc_eq_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    h = h.add_(shift.squeeze(1)).remainder_(1.0)

    v = maxc
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int32).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)

    # v2 picks (r, g, b) from (v, p, q, t) with a lookup table indexed by the sector i; a
    # table tensor would be a host-to-device copy per batch, so the same choice as where().
    def pick(sectors: dict[int, Tensor]) -> Tensor:
        out = p
        for sector, value in sectors.items():
            out = torch.where(i == sector, value, out)
        return out

    red = pick({0: v, 1: q, 4: t, 5: v})
    green = pick({0: t, 1: v, 2: v, 3: q})
    blue = pick({2: t, 3: v, 4: v, 5: q})
    return torch.stack((red, green, blue), 1)
