"""Batch-wise augmentation on tensors: one random affine warp per image, on the batch's device.

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


class BatchRandomAffine(nn.Module):
    """Random rotation, translation, scale and shear per image, plus an optional h-flip.

    Args:
        degrees: rotation drawn from [-degrees, degrees].
        translate: shift as a fraction of the image size, drawn from [-translate, translate].
        scale: zoom factor range (low, high).
        shear: shear angle in degrees drawn from [-shear, shear].
        hflip: probability of a horizontal flip (0 for digits, 0.5 for most photos).
        p: probability that an image is warped at all.
        padding_mode: "zeros", "border" or "reflection" for pixels warped in from outside.
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
    ) -> None:
        super().__init__()
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(
                f"augment.scale must be (low, high) with 0 < low <= high, got {scale}"
            )
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ConfigError(
                f"augment.padding_mode={padding_mode!r}; expected zeros, border or reflection"
            )
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.shear = float(shear)
        self.hflip = float(hflip)
        self.p = float(p)
        self.padding_mode = padding_mode

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
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device)
        return torch.where(keep.view(-1, 1, 1), identity, theta)

    def forward(self, images: Tensor) -> Tensor:
        theta = self.matrices(images.shape[0], images.device).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False
        )
