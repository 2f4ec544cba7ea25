"""Multi-crop augmentation as batched tensor operations on the training device.

Every sample draws its own parameters (crop box, flip, rotation, colour
factors) from a seeded generator; the work itself is one affine_grid +
grid_sample per crop group and a few element-wise ops, with no Python loop
over samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distcluster.config import AugmentConfig, CropGroup

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def crop_affines(n: int, group: CropGroup, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-sample affine maps (n, 2, 3) from output to input coordinates in [-1, 1].

    The box covers `scale` of the area with aspect in `ratio` (log-uniform), lies
    inside the image, is mirrored with probability `flip`, and is rotated and
    sheared by up to `rotate_degrees` / `shear_degrees`.
    """
    area = _uniform(n, *group.scale, gen)
    log_ratio = _uniform(n, math.log(group.ratio[0]), math.log(group.ratio[1]), gen)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre_x = _uniform(n, -1, 1, gen) * (1 - width)
    centre_y = _uniform(n, -1, 1, gen) * (1 - height)
    mirror = torch.where(torch.rand(n, generator=gen) < aug.flip, -1.0, 1.0)
    angle = torch.deg2rad(_uniform(n, -aug.rotate_degrees, aug.rotate_degrees, gen))
    shear = torch.tan(torch.deg2rad(_uniform(n, -aug.shear_degrees, aug.shear_degrees, gen)))
    cos, sin = angle.cos(), angle.sin()
    # A = rotation @ shear @ diag(mirror * width, height)
    sx, sy = mirror * width, height
    theta = torch.stack([
        torch.stack([cos * sx, (cos * shear - sin) * sy, centre_x], dim=-1),
        torch.stack([sin * sx, (sin * shear + cos) * sy, centre_y], dim=-1),
    ], dim=1)
    return theta


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` turns (N,) in YIQ space: cheap and batched."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype)
    angle = shift * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([torch.stack([one, zero, zero], -1),
                            torch.stack([zero, cos, -sin], -1),
                            torch.stack([zero, sin, cos], -1)], dim=1)  # (N, 3, 3)
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("nij,njhw->nihw", matrix, x)


def colour_jitter(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, hue with probability jitter_p, then greyscale
    with probability grey_p; x: (N, C, H, W) in [0, 1]. Greyscale images skip the colour parts."""
    n, channels = x.shape[:2]
    brightness, contrast, saturation, hue = aug.jitter

    def factor(strength: float) -> torch.Tensor:
        return _uniform(n, max(0.0, 1 - strength), 1 + strength, gen).to(x).view(n, 1, 1, 1)

    jittered = x * factor(brightness)
    grey = _grey(jittered) if channels == 3 else jittered
    jittered = (jittered - grey.mean((1, 2, 3), keepdim=True)) * factor(contrast) \
        + grey.mean((1, 2, 3), keepdim=True)
    if channels == 3:
        grey = _grey(jittered)
        jittered = (jittered - grey) * factor(saturation) + grey
        jittered = _rotate_hue(jittered, _uniform(n, -hue, hue, gen).to(x))
    apply = (torch.rand(n, generator=gen) < aug.jitter_p).to(x.device).view(n, 1, 1, 1)
    x = torch.where(apply, jittered, x).clamp(0, 1)
    if channels == 3:
        to_grey = (torch.rand(n, generator=gen) < aug.grey_p).to(x.device).view(n, 1, 1, 1)
        x = torch.where(to_grey, _grey(x).expand_as(x), x)
    return x


class MultiCrop:
    """uint8 images (B, C, H, W) -> one normalised float tensor (count * B, C, s, s) per crop group.

    Crops are laid out crop-major: rows [c * B, (c + 1) * B) are crop c of every image.
    """

    def __init__(self, aug: AugmentConfig, mean: list[float], std: list[float]) -> None:
        self.aug = aug
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        x = images.float().div_(255)
        groups = []
        for group in self.aug.crops:
            n = group.count * x.shape[0]
            theta = crop_affines(n, group, self.aug, gen).to(x)
            source = x.repeat(group.count, 1, 1, 1)
            grid = F.affine_grid(theta, [n, x.shape[1], group.size, group.size], align_corners=False)
            crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)
            groups.append(self.normalize(colour_jitter(crops, self.aug, gen)))
        return groups

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def whole(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised image, as used for evaluation and predict."""
        return self.normalize(images.float().div(255))
