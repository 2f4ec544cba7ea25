"""Multi-crop augmentation as batched tensor operations on the training device.

Every sample draws its own parameters (crop box, flip, rotation, colour
factors, greyscale, blur, solarize) from a seeded generator; the work itself is one affine_grid +
grid_sample per crop group and a few element-wise ops, with no Python loop
over samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distcluster.common.errors import check, check_range


@dataclass
class CropGroup:
    """`count` crops of `size` px covering `scale` of the image area, aspect `ratio`. A `plain`
    group is cropped and resized only: no flip, rotation, shear, colour, blur or solarize
    (IIC's anchor view x, paired with transformed views g(x))."""

    count: int = 2
    size: int = 28
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    plain: bool = False

    def validate(self, key: str) -> None:
        check(self.count >= 1, f"{key}.count", self.count, "must be >= 1")
        check(self.size >= 2, f"{key}.size", self.size, "must be >= 2")
        check_range(f"{key}.scale", self.scale, 1e-3, 1.0)
        check_range(f"{key}.ratio", self.ratio, 1e-2, 1e2)


@dataclass
class AugmentConfig:
    """Multi-crop augmentation, run as batched tensor ops on the training device."""

    crops: list[CropGroup] = field(
        default_factory=lambda: [CropGroup(2, 28, (0.2, 1.0)), CropGroup(4, 18, (0.08, 0.4))]
    )
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grey_p: float = 0.25
    rotate_degrees: float = 0.0
    shear_degrees: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the crop
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # in [0, 1] pixel units

    def validate(self, image_size: int | None = None) -> None:
        check(len(self.crops) >= 1, "augment.crops", self.crops, "needs at least one group")
        for i, group in enumerate(self.crops):
            group.validate(f"augment.crops[{i}]")
            if image_size is not None:
                check(group.size <= image_size, f"augment.crops[{i}].size", group.size,
                       f"crop larger than the {image_size} px images")
        for name in ("flip", "jitter_p", "grey_p", "blur_p", "solarize_p", "solarize_threshold"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"augment.{name}", value, "probability must be in [0, 1]")
        check(len(self.jitter) == 4 and all(v >= 0 for v in self.jitter), "augment.jitter",
               list(self.jitter), "must be 4 non-negative numbers (brightness, contrast, "
               "saturation, hue)")
        check(self.jitter[3] <= 0.5, "augment.jitter", list(self.jitter), "hue must be <= 0.5")
        check(0 <= self.rotate_degrees <= 180, "augment.rotate_degrees", self.rotate_degrees,
               "must be in [0, 180]")
        check(0 <= self.shear_degrees < 90, "augment.shear_degrees", self.shear_degrees,
               "must be in [0, 90)")
        check_range("augment.blur_sigma", self.blur_sigma, 0.0, 100.0)

    @property
    def num_crops(self) -> int:
        return sum(group.count for group in self.crops)



# The fixed, mild perturbation of the label-free score (metrics.view_mi): the same for every
# trial whatever its own augmentation, so that trials are compared on equal terms. Label-
# preserving for digits and photos alike: no flip, small rotation, gentle crop and light.
PROBE = AugmentConfig(crops=[CropGroup(1, 0, (0.7, 1.0), (0.8, 1.25))], flip=0.0,
                      jitter=(0.2, 0.2, 0.0, 0.0), jitter_p=1.0, grey_p=0.0, rotate_degrees=10.0)
PROBE_SEED = 20260101

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) grey, for colour jitter and for one-channel models alike."""
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel; x (N, C, H, W) in [0, 1], mean and std (1, C, 1, 1). The one
    normalisation of training crops, evaluation and predict."""
    return (x - mean.to(x)) / std.to(x)


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
    grey = luma(jittered) if colour else jittered
    mean = grey.mean((1, 2, 3), keepdim=True)
    jittered = (jittered - mean) * _per_sample(p.contrast, x).to(x) + mean
    if colour:
        grey = luma(jittered)
        jittered = (jittered - grey) * _per_sample(p.saturation, x).to(x) + grey
        jittered = _rotate_hue(jittered, p.hue.to(x))
    x = torch.where(_per_sample(p.jitter, x), jittered, x).clamp(0, 1)
    if colour:
        x = torch.where(_per_sample(p.grey, x), luma(x).expand_as(x), x)
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
        return normalize(x, self.mean, self.std)

    def whole(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised image, as used for evaluation and predict."""
        return self.normalize(images.float().div(255))

    def probe(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A PROBE-perturbed, normalised copy of each image at its own size."""
        group = dataclasses.replace(PROBE.crops[0], size=images.shape[-1])
        return self.normalize(_crop_group(images.float().div(255), group, PROBE, gen))
