import torch

from distcluster.augment import MultiCrop, colour_jitter, crop_affines
from distcluster.config import AugmentConfig, CropGroup


def _images(n=32, c=3, size=16):
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_crop_groups_have_their_shapes_and_are_crop_major():
    aug = AugmentConfig(crops=[CropGroup(2, 12, (0.3, 1.0)), CropGroup(3, 6, (0.1, 0.4))])
    groups = MultiCrop(aug, [0.5] * 3, [0.25] * 3)(_images(), torch.Generator().manual_seed(0))
    assert [g.shape for g in groups] == [(64, 3, 12, 12), (96, 3, 6, 6)]


def test_crop_boxes_stay_in_their_scale_range_and_inside_the_image():
    group = CropGroup(1, 8, (0.2, 0.5), (0.75, 1.333))
    aug = AugmentConfig(crops=[group], flip=0.5)
    theta = crop_affines(4000, group, aug, torch.Generator().manual_seed(0))
    area = theta[:, :, :2].det().abs()  # fraction of the image area (both axes span [-1, 1])
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 0.5 + 1e-5
    half_width, half_height = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()
    assert (theta[:, 0, 2].abs() + half_width <= 1 + 1e-5).all()
    assert (theta[:, 1, 2].abs() + half_height <= 1 + 1e-5).all()
    mirrored = (theta[:, 0, 0] < 0).float().mean()
    assert 0.45 < mirrored < 0.55


def test_parameters_differ_per_sample_and_are_reproducible():
    aug = AugmentConfig(crops=[CropGroup(2, 8, (0.2, 1.0))])
    crop = MultiCrop(aug, [0.5] * 3, [0.25] * 3)
    image = _images(1).repeat(16, 1, 1, 1)  # the same image 16 times
    first = crop(image, torch.Generator().manual_seed(7))[0]
    again = crop(image, torch.Generator().manual_seed(7))[0]
    other = crop(image, torch.Generator().manual_seed(8))[0]
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    distinct = {tuple(x.flatten()[:20].tolist()) for x in first}
    assert len(distinct) == 32


def test_colour_jitter_stays_in_range_and_greyscale_makes_channels_equal():
    x = torch.rand(64, 3, 4, 4)
    out = colour_jitter(x, AugmentConfig(jitter_p=1.0, grey_p=1.0), torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[:, 0], out[:, 1])


def test_single_channel_images_are_supported():
    aug = AugmentConfig(crops=[CropGroup(2, 8, (0.5, 1.0))], rotate_degrees=15, shear_degrees=10)
    groups = MultiCrop(aug, [0.3], [0.3])(_images(c=1, size=8), torch.Generator().manual_seed(0))
    assert groups[0].shape == (64, 1, 8, 8) and torch.isfinite(groups[0]).all()
