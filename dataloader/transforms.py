"""Tensor conversions shared by the datasets: uint8 pixels -> float [-1, 1], resizing, channels, flips, and the
conditions derived from an image (a low-resolution copy, pixel positions)."""

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 array [H,W] or [H,W,C] -> float tensor [C,H,W] in [-1, 1]."""
    array = pixels[:, :, None] if pixels.ndim == 2 else pixels
    image = torch.from_numpy(np.array(array)).permute(2, 0, 1)
    return image.float().div_(127.5).sub_(1.0)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a square [C,H,W] image to [C,size,size], bilinear with antialiasing on downscale."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    resized = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp_(-1.0, 1.0)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat a grayscale image to 3 channels, or reduce RGB to luma for 1 channel."""
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return image.expand(3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA, dtype=image.dtype).view(3, 1, 1)
        return (image * weights).sum(0, keepdim=True)
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels (use 1 or 3).")


def random_hflip(image: torch.Tensor) -> torch.Tensor:
    """Flip left-right with probability 1/2, drawing from torch's global generator (seeded per worker)."""
    if torch.rand(()) < 0.5:
        return image.flip(-1)
    return image


def random_hflip_pair(image: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip an image and its condition map together, with one draw as ``random_hflip`` makes."""
    if torch.rand(()) < 0.5:
        return image.flip(-1), condition.flip(-1)
    return image, condition


def upsample(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of a [C,h,w] image to [C,height,width], clamped to [-1, 1]."""
    resized = F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False)
    return resized[0].clamp_(-1.0, 1.0)


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """The [C,H,W] or [N,C,H,W] image at 1/``factor`` of its size (bicubic, antialiased, not clamped)."""
    height, width = image.shape[-2:]
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"a low-res copy needs image sides divisible by the factor, got {height}x{width} and "
                         f"factor {factor}.")
    batch = image if image.dim() == 4 else image[None]
    small = F.interpolate(batch, size=(height // factor, width // factor), mode="bicubic", align_corners=False,
                          antialias=True)
    return small if image.dim() == 4 else small[0]


def lowres_condition(image: torch.Tensor, factor: int) -> torch.Tensor:
    """The [C,H,W] image at 1/``factor`` of its size (``downsample``), upsampled back to H x W (bicubic)."""
    height, width = image.shape[-2:]
    return upsample(downsample(image, factor), height, width)


def coord_map(height: int, width: int) -> torch.Tensor:
    """[1,H,W] float map of each pixel's raster position (y * W + x) / (H * W), in [0, 1)."""
    positions = torch.arange(height * width, dtype=torch.float64) / (height * width)
    return positions.view(1, height, width).float()
