import pytest
import torch

from mmpt.config import AugmentConfig
from mmpt.data.transforms import DeviceTransform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUGMENT = AugmentConfig(hflip=True, vflip=True, rotate_degrees=15, random_resized_crop=True)


def _rgb(n: int = 4, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalized(images: torch.Tensor) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).double() / 255  # N×H×W×3 -> N×3×H×W
    return ((x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).float()


@pytest.mark.parametrize("size", [32, 224])
def test_pad_centres_the_image_on_a_zero_canvas(size):
    images = _rgb()
    out = DeviceTransform(input_size=size, mean=MEAN, std=STD)(images)
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    margin = (size - 28) // 2
    centre = out[:, :, margin : margin + 28, margin : margin + 28]
    torch.testing.assert_close(centre, _normalized(images))
    border = out.clone()
    border[:, :, margin : margin + 28, margin : margin + 28] = 0
    assert torch.count_nonzero(border) == 0


def test_black_padding_is_the_normalized_value_of_a_black_pixel():
    images = _rgb()
    images[:, 0, 0] = 0  # a black pixel at the image's corner, (2, 2) on the canvas
    out = DeviceTransform(input_size=32, mean=MEAN, std=STD, pad_value="black")(images)
    black = out[0, :, 2, 2]
    torch.testing.assert_close(black, torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]))
    for c in range(3):
        assert torch.all(out[:, c, :2, :] == black[c]) and torch.all(out[:, c, :, 30:] == black[c])


def test_resize_gives_the_input_size():
    for interpolation in ("bilinear", "bicubic"):
        transform = DeviceTransform(input_size=64, mode="resize", interpolation=interpolation)
        assert transform(_rgb()).shape == (4, 3, 64, 64)
    assert DeviceTransform(input_size=16, mode="resize")(_rgb()).shape == (4, 3, 16, 16)


def test_native_keeps_the_image_size():
    assert DeviceTransform(input_size=224, mode="native")(_rgb()).shape == (4, 3, 28, 28)


def test_grey_images_become_three_identical_channels_before_normalizing():
    grey = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    out = DeviceTransform(input_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(grey)
    assert out.shape == (2, 3, 28, 28)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_normalization_of_a_known_pixel_is_exact():
    images = torch.zeros(1, 28, 28, 3, dtype=torch.uint8)
    images[0, 5, 7] = torch.tensor([255, 0, 51], dtype=torch.uint8)
    out = DeviceTransform(input_size=28, mean=MEAN, std=STD)(images)
    expected = [(1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (0.2 - MEAN[2]) / STD[2]]
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor(expected), rtol=0, atol=1e-6)


def test_augmentation_is_reproducible_from_the_generator_seed():
    transform = DeviceTransform(input_size=32, augment=AUGMENT)
    images = _rgb(n=8)

    def run(seed):
        return transform(images, generator=torch.Generator().manual_seed(seed), train=True)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert not torch.equal(run(1), transform(images))  # augmentation actually changes the images


def test_evaluation_is_never_augmented():
    images = _rgb()
    transform = DeviceTransform(input_size=32, augment=AUGMENT)
    evaluated = transform(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(evaluated, DeviceTransform(input_size=32)(images))


def test_augmentation_is_off_by_default():
    images = _rgb()
    transform = DeviceTransform(input_size=32)
    train = transform(images, generator=torch.Generator().manual_seed(0), train=True)
    assert torch.equal(train, transform(images))


def test_horizontal_flip_mirrors_some_samples_and_keeps_the_others():
    images = _rgb(n=16)
    transform = DeviceTransform(input_size=28, augment=AugmentConfig(hflip=True))
    plain = transform(images)
    out = transform(images, generator=torch.Generator().manual_seed(0), train=True)
    flipped = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain)]
    kept = [torch.equal(o, p) for o, p in zip(out, plain)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


@pytest.mark.parametrize(
    "kwargs", [dict(mode="crop"), dict(pad_value="white"), dict(interpolation="nearest"), dict(input_size=0)]
)
def test_unknown_transform_options_are_rejected(kwargs):
    with pytest.raises(AssertionError):
        DeviceTransform(**(dict(input_size=32) | kwargs))
