"""Batch-wise augmentation on tensors: a random affine (and elastic) warp per image, on device.

Applied by the data module after the batch reaches the device, for training only; tensor
data never goes through per-item PIL transforms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese.errors import ConfigError


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(
    name: str, value: object, low: float, high: float | None, hint: str, open_high: bool = False
) -> None:
    """Refuse ``data.augment.<name>`` outside [low, high] (None: no upper bound)."""
    top = math.inf if high is None else high
    inside = _is_real(value) and low <= value and (value < top if open_high else value <= top)
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
            or not all(_is_real(s) for s in scale)
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
        if not _is_real(elastic_sigma) or not elastic_sigma > 0:
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
