import torch

from distcluster.data.augment import (
    AugmentConfig,
    CropGroup,
    MultiCrop,
    apply_colour,
    colour_jitter,
    crop_affines,
    draw_colour_params,
    gaussian_blur,
)


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


def test_colour_parameters_stay_in_their_ranges_and_differ_per_sample():
    aug = AugmentConfig(jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.8, grey_p=0.2, blur_p=0.5,
                        blur_sigma=(0.5, 1.5), solarize_p=0.3)
    p = draw_colour_params(20_000, aug, torch.Generator().manual_seed(0))
    for values, low, high in [(p.brightness, 0.6, 1.4), (p.contrast, 0.7, 1.3), (p.saturation, 0.8, 1.2),
                              (p.hue, -0.1, 0.1)]:
        assert values.min() >= low and values.max() <= high and values.unique().numel() > 19_000
    blurred = p.blur_sigma > 0
    assert p.blur_sigma[blurred].min() >= 0.5 and p.blur_sigma.max() <= 1.5
    for mask, rate in [(p.jitter, 0.8), (p.grey, 0.2), (blurred, 0.5), (p.solarize, 0.3)]:
        assert abs(mask.float().mean() - rate) < 0.02
    again = draw_colour_params(20_000, aug, torch.Generator().manual_seed(0))
    assert torch.equal(p.blur_sigma, again.blur_sigma) and torch.equal(p.hue, again.hue)


def test_gaussian_blur_known_answers():
    x = torch.zeros(3, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # an impulse: the output is the kernel itself
    out = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(out[0], x[0])  # sigma 0: unchanged
    offsets = torch.arange(-6, 7, dtype=torch.float32)  # radius 3 * max sigma
    g = torch.exp(-offsets.square() / 2)
    g = g / g.sum()
    torch.testing.assert_close(out[1, 0, 4, 1:8], g[3:10] * g[6])  # separable: row through the centre
    assert out[2, 0, 4, 4] < out[1, 0, 4, 4]  # wider sigma, lower peak
    flat = gaussian_blur(torch.full((2, 3, 8, 8), 0.3), torch.tensor([0.7, 1.9]))
    torch.testing.assert_close(flat, torch.full_like(flat, 0.3))


def test_solarize_inverts_pixels_above_the_threshold_only_where_drawn():
    aug = AugmentConfig(jitter_p=0.0, grey_p=0.0, solarize_p=1.0, solarize_threshold=0.5)
    x = torch.tensor([0.1, 0.49, 0.5, 0.9]).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    p = draw_colour_params(2, aug, torch.Generator().manual_seed(0))
    p.solarize = torch.tensor([True, False])
    out = apply_colour(x, p, aug)
    torch.testing.assert_close(out[0, 0].flatten(), torch.tensor([0.1, 0.49, 0.5, 0.1]))
    torch.testing.assert_close(out[1], x[1])


def test_crop_groups_of_one_size_pass_the_backbone_as_one_tensor():
    aug = AugmentConfig(crops=[CropGroup(2, 8, (0.5, 1.0)), CropGroup(1, 8, (0.2, 0.5)),
                               CropGroup(3, 6, (0.1, 0.3))])
    groups = MultiCrop(aug, [0.5] * 3, [0.25] * 3)(_images(4), torch.Generator().manual_seed(0))
    assert [g.shape[:2] for g in groups] == [(12, 3), (12, 3)]


def test_the_probe_view_is_reproducible_in_range_and_keeps_the_image_size():
    crop = MultiCrop(AugmentConfig(crops=[CropGroup(2, 8, (0.2, 1.0))]), [0.5] * 3, [0.25] * 3)
    images = _images(8, size=16)
    first = crop.probe(images, torch.Generator().manual_seed(1))
    again = crop.probe(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)
    assert first.shape == (8, 3, 16, 16)
    assert first.min() >= -2 - 1e-5 and first.max() <= 2 + 1e-5  # (x - 0.5) / 0.25 of [0, 1]
    plain = crop.normalize(images.float().div(255))
    assert not torch.allclose(first, plain)
    # A mild perturbation: much closer to its own image than to another image.
    own = (first - plain).abs().mean()
    other = (first - plain.roll(1, 0)).abs().mean()
    assert own < 0.8 * other
