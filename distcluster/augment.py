"""Multi-crop augmentation as batched tensor operations on the training device.

Every sample draws its own parameters (crop box, flip, rotation, colour
factors, greyscale, blur, solarize) from a seeded generator; the work itself is one affine_grid +
grid_sample per crop group and a few element-wise ops, with no Python loop
over samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distcluster.config import AugmentConfig, CropGroup

# The fixed, mild perturbation of the label-free score (metrics.view_mi): the same for every
# trial whatever its own augmentation, so that trials are compared on equal terms. Label-
# preserving for digits and photos alike: no flip, small rotation, gentle crop and light.
PROBE = AugmentConfig(crops=[CropGroup(1, 0, (0.7, 1.0), (0.8, 1.25))], flip=0.0,
                      jitter=(0.2, 0.2, 0.0, 0.0), jitter_p=1.0, grey_p=0.0, rotate_degrees=10.0)
PROBE_SEED = 20260101

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


@dataclass
class ColourParams:
    """Per-sample colour draws; factors are multiplicative, hue is in turns."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    jitter: torch.Tensor  # bool: apply the four jitters
    grey: torch.Tensor  # bool
    blur_sigma: torch.Tensor  # pixels; 0 = no blur
    solarize: torch.Tensor  # bool


def draw_colour_params(n: int, aug: AugmentConfig, gen: torch.Generator) -> ColourParams:
    brightness, contrast, saturation, hue = aug.jitter

    def factor(strength: float) -> torch.Tensor:
        return _uniform(n, max(0.0, 1 - strength), 1 + strength, gen)

    def chance(p: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) < p

    blurred = chance(aug.blur_p)
    return ColourParams(
        brightness=factor(brightness), contrast=factor(contrast), saturation=factor(saturation),
        hue=_uniform(n, -hue, hue, gen), jitter=chance(aug.jitter_p), grey=chance(aug.grey_p),
        blur_sigma=torch.where(blurred, _uniform(n, *aug.blur_sigma, gen), 0.0),
        solarize=chance(aug.solarize_p))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma in pixels (N,); sigma 0 leaves a sample as it is."""
    n, channels, height, width = x.shape
    radius = min(math.ceil(3 * float(sigma.max())), height - 1, width - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    spread = sigma.to(x).clamp_min(1e-3).view(n, 1)
    kernel = torch.exp(-offsets.square() / (2 * spread.square()))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (N * C, 2r + 1)
    y = x.reshape(1, n * channels, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * channels, 1, 1, -1),
                 groups=n * channels)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(n * channels, 1, -1, 1),
                 groups=n * channels)
    return y.view(n, channels, height, width)


def _per_sample(mask_or_values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask_or_values.to(x.device).view(-1, 1, 1, 1)


def apply_colour(x: torch.Tensor, p: ColourParams, aug: AugmentConfig) -> torch.Tensor:
    """Jitter (brightness, contrast, saturation, hue), greyscale, blur, solarize; x (N, C, H, W)
    in [0, 1]. One-channel images skip saturation, hue and greyscale."""
    colour = x.shape[1] == 3
    jittered = x * _per_sample(p.brightness, x).to(x)
    luma = _grey(jittered) if colour else jittered
    mean = luma.mean((1, 2, 3), keepdim=True)
    jittered = (jittered - mean) * _per_sample(p.contrast, x).to(x) + mean
    if colour:
        luma = _grey(jittered)
        jittered = (jittered - luma) * _per_sample(p.saturation, x).to(x) + luma
        jittered = _rotate_hue(jittered, p.hue.to(x))
    x = torch.where(_per_sample(p.jitter, x), jittered, x).clamp(0, 1)
    if colour:
        x = torch.where(_per_sample(p.grey, x), _grey(x).expand_as(x), x)
    if aug.blur_p > 0:
        x = gaussian_blur(x, p.blur_sigma.to(x.device))
    if aug.solarize_p > 0:
        x = torch.where(_per_sample(p.solarize, x) & (x >= aug.solarize_threshold), 1 - x, x)
    return x


def colour_jitter(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Draw per-sample colour parameters and apply them."""
    return apply_colour(x, draw_colour_params(x.shape[0], aug, gen), aug)


def _crop_group(x: torch.Tensor, group: CropGroup, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """`group.count` crops of every image in x (B, C, H, W) in [0, 1], crop-major, colour-jittered
    (a `plain` group: cropped and resized only)."""
    n = group.count * x.shape[0]
    geometry = aug
    if group.plain:
        geometry = dataclasses.replace(aug, flip=0.0, rotate_degrees=0.0, shear_degrees=0.0)
    theta = crop_affines(n, group, geometry, gen).to(x)
    grid = F.affine_grid(theta, [n, x.shape[1], group.size, group.size], align_corners=False)
    crops = F.grid_sample(x.repeat(group.count, 1, 1, 1), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return crops if group.plain else colour_jitter(crops, aug, gen)


class MultiCrop:
    """uint8 images (B, C, H, W) -> one normalised float tensor (count * B, C, s, s) per crop size.

    Crops are laid out crop-major: rows [c * B, (c + 1) * B) are crop c of every image;
    adjacent crop groups of one size are joined so that they pass the backbone together.
    """

    def __init__(self, aug: AugmentConfig, mean: list[float], std: list[float]) -> None:
        self.aug = aug
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        x = images.float().div_(255)
        groups = []
        for group in self.aug.crops:
            crops = self.normalize(_crop_group(x, group, self.aug, gen))
            if groups and groups[-1].shape[-1] == group.size:  # one backbone pass per crop size
                groups[-1] = torch.cat([groups[-1], crops])
            else:
                groups.append(crops)
        return groups

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def whole(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised image, as used for evaluation and predict."""
        return self.normalize(images.float().div(255))

    def probe(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A PROBE-perturbed, normalised copy of each image at its own size."""
        group = dataclasses.replace(PROBE.crops[0], size=images.shape[-1])
        return self.normalize(_crop_group(images.float().div(255), group, PROBE, gen))
