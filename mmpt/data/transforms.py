"""On-device preprocessing of uint8 batches: float, grey -> 3 channels, normalize, pad or resize, augment.

Everything is a batched tensor op on the batch's device, with no host-device synchronisation: the
normalisation constants live on the device (`to(device)`), and random augmentation draws its numbers on
the batch's device from a torch.Generator the caller passes in, so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.config import AugmentConfig
from mmpt.config.choices import INPUT_MODES, INTERPOLATIONS, PAD_VALUES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeviceTransform:
    """Turn uint8 N×H×W or N×H×W×3 batches into normalized float32 N×3×S×S model inputs.

    mode "pad" centres the image on an S×S canvas (extra pixel of an odd margin at bottom/right),
    as Doerrich et al. and Bachmeier pad MedMNIST+ images; an image larger than S is resized
    instead. pad_value "normalized_zero" fills with 0 after normalization (torchvision Pad after
    Normalize), "black" with the normalized value of a black pixel, (0 - mean) / std per channel.
    mode "resize" interpolates to S×S (antialiased when shrinking); "native" keeps H×W.
    """

    def __init__(
        self,
        *,
        input_size: int,
        mode: str = "pad",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pad_value: str = "normalized_zero",
        interpolation: str = "bilinear",
        augment: AugmentConfig | None = None,
    ) -> None:
        """The options are those of input.* (mmpt.config.choices), checked where the config was loaded."""
        for value, known in ((mode, INPUT_MODES), (pad_value, PAD_VALUES), (interpolation, INTERPOLATIONS)):
            assert value in known, f"transform option {value!r} is not one of {', '.join(known)}"
        assert input_size >= 1, f"input size must be >= 1, got {input_size}"
        assert len(mean) == 3 and len(std) == 3, f"mean and std need 3 values, got {tuple(mean)} and {tuple(std)}"
        self.input_size = input_size
        self.mode = mode
        self.pad_value = pad_value
        self.interpolation = interpolation
        self.augment = augment or AugmentConfig()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to(self, device: torch.device) -> DeviceTransform:
        """Move the normalisation constants to `device` once, so no call copies them."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @property
    def augments(self) -> bool:
        """Whether the augment config turns on any random augmentation."""
        a = self.augment
        return a.hflip or a.vflip or a.rotate_degrees > 0 or a.random_resized_crop

    def __call__(self, images: Tensor, generator: torch.Generator | None = None, train: bool = False) -> Tensor:
        """Return float32 N×3×S×S (N×3×H×W for "native") on `images.device`.

        Augmentation runs only with train=True; its random numbers come from `generator`, a
        torch.Generator on `images.device` (None = torch's global generator of that device).
        Raises ValueError unless `images` is uint8 N×H×W or N×H×W×3.
        """
        if images.dtype != torch.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"expected uint8 N×H×W or N×H×W×3 images, got {images.dtype} {tuple(images.shape)}")
        if images.ndim == 3:
            x = images.unsqueeze(1)  # N×H×W -> N×1×H×W
        else:
            x = images.permute(0, 3, 1, 2)  # N×H×W×3 -> N×3×H×W
        x = x.float().div_(255)
        x = x.expand(-1, 3, -1, -1)  # grey -> 3 identical channels; a view until normalize writes a new tensor
        # a no-op after to(device): the constants already live there
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        x = (x - mean) / std
        x = self._size(x, mean, std)
        if train and self.augments:
            x = self._augment(x, generator)
        return x

    def _size(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        size = self.input_size
        height, width = x.shape[-2:]
        if self.mode == "native" or (height == size and width == size):
            return x
        if self.mode == "pad" and height <= size and width <= size:
            fill = torch.zeros_like(mean) if self.pad_value == "normalized_zero" else -mean / std
            canvas = fill.expand(x.shape[0], 3, size, size).contiguous()  # 1×3×1×1 -> N×3×S×S
            top, left = (size - height) // 2, (size - width) // 2
            canvas[:, :, top : top + height, left : left + width] = x
            return canvas
        shrinking = height > size or width > size
        return F.interpolate(x, size=(size, size), mode=self.interpolation, align_corners=False, antialias=shrinking)

    def _augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        a = self.augment
        n = x.shape[0]
        # a fixed number of draws per call, whatever is enabled, so streams stay aligned across configs
        draws = torch.rand(n, 7, generator=generator, device=x.device)  # N×7 uniform [0, 1)
        hflip, vflip, angle_u, scale_u, aspect_u, cx_u, cy_u = draws.unbind(1)
        if a.hflip:
            x = torch.where((hflip < 0.5).view(n, 1, 1, 1), x.flip(-1), x)
        if a.vflip:
            x = torch.where((vflip < 0.5).view(n, 1, 1, 1), x.flip(-2), x)
        if a.rotate_degrees == 0 and not a.random_resized_crop:
            return x
        angle = torch.deg2rad((2 * angle_u - 1) * a.rotate_degrees)
        # crop: a fraction `scale` of the area, aspect ratio in [3/4, 4/3], sides (in image widths) clamped to 1
        if a.random_resized_crop:
            scale = a.crop_scale_min + (1 - a.crop_scale_min) * scale_u
            aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * aspect_u)
            crop_w = torch.sqrt(scale * aspect).clamp(max=1)
            crop_h = torch.sqrt(scale / aspect).clamp(max=1)
            centre_x = (1 - crop_w) * (2 * cx_u - 1)
            centre_y = (1 - crop_h) * (2 * cy_u - 1)
        else:
            crop_w = crop_h = torch.ones_like(scale_u)
            centre_x = centre_y = torch.zeros_like(scale_u)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: rotate the crop box by `angle` about its centre
        theta = torch.stack(
            [
                torch.stack([crop_w * cos, -crop_h * sin, centre_x], dim=1),
                torch.stack([crop_w * sin, crop_h * cos, centre_y], dim=1),
            ],
            dim=1,
        )  # N×2×3
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # samples outside the image read 0, the normalized_zero pad value
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
