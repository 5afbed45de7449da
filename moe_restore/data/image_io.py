"""Reading and writing images as float32 tensors [3, H, W] in [0, 1].

Conversions on read (documented, never silent failures):

* 8-bit images are divided by 255, 16-bit images by 65535 (no clipping of the high byte);
  floating-point images are clipped to [0, 1].
* Grayscale images are replicated to three channels; an alpha channel is dropped (the colour
  channels are kept as stored, not composited); grayscale + alpha keeps the gray channel.
* Images smaller than ``min_size`` pixels on a side, files that cannot be decoded and channel
  layouts other than the above raise ``ValueError`` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_restore.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WRITE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder {str(folder)!r} does not exist or is not a directory")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def array_to_tensor(array: np.ndarray, *, name: str = "image", min_size: int = 8) -> torch.Tensor:
    """Convert an H x W or H x W x C array (uint8, uint16 or float) as described above."""
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        values = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        values = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise UserError(f"{name}: unsupported pixel type {array.dtype} (want 8-bit, 16-bit or float)")
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3 or values.shape[2] not in (1, 2, 3, 4):
        raise UserError(f"{name}: unsupported layout {array.shape} (want gray, gray+alpha, RGB or RGBA)")
    if values.shape[2] in (1, 2):
        values = np.repeat(values[:, :, :1], 3, axis=2)
    values = values[:, :, :3]
    h, w = values.shape[:2]
    if min(h, w) < min_size:
        raise UserError(f"{name}: image is {h}x{w}, smaller than the minimum {min_size} px per side")
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))


def read_image(path: str | Path, *, min_size: int = 8) -> torch.Tensor:
    """Read an image file as float32 [3, H, W] in [0, 1] (see the module docstring)."""
    import imageio.v3 as iio

    path = Path(path)
    try:
        array = np.asarray(iio.imread(path))
    except Exception as error:  # imageio raises many types for undecodable files
        raise UserError(f"cannot read image {str(path)!r}: {error}") from error
    if array.ndim == 4:
        raise UserError(f"{path}: multi-frame images are not supported (shape {array.shape})")
    return array_to_tensor(array, name=str(path), min_size=min_size)


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> H x W x 3 uint8 (rounded, clipped)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape [3, H, W], got {tuple(image.shape)}")
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(array)


def write_image(path: str | Path, image: torch.Tensor) -> None:
    """Write [3, H, W] in [0, 1] as 8-bit PNG or JPEG (quality 95), chosen by the suffix."""
    import imageio.v3 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise UserError(f"path {str(path)!r}: output format must be one of {WRITE_SUFFIXES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 95} if suffix in (".jpg", ".jpeg") else {}
    iio.imwrite(path, tensor_to_uint8(image), **extra)
