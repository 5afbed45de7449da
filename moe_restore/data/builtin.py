"""The built-in sample set: natural photographs that scikit-image ships inside its wheel.

No download: the files live in ``skimage/data``. Training uses seven colour photographs and six
grayscale ones (textures: brick, grass, gravel; the cameraman, coins, the moon), replicated to
three channels by ``read_image``, for more varied content than seven photographs (the demo's
haze result depends on it most: docs/m2ir.md). The split is fixed by name, so that the held-out
test images are never seen in training (the two motorcycle views are near-duplicates and sit on
the same side). Three held-out images: two colour photographs (chelsea, rocket) and a grey
micrograph (cell), on which any colour cast of a restorer shows plainly (its channels must stay
equal); astronaut, tried as the third, put the demo's blur under the identity (docs/m2ir.md).
Images larger than ``max_side`` on their longer side are downscaled by area
averaging (retina and the Hubble deep field are 1000-1400 px).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from moe_restore.data.image_io import read_image

TRAIN_FILES = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
               "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
               "brick.png", "camera.png", "coins.png", "grass.png", "gravel.png", "moon.png")
TEST_FILES = ("chelsea.png", "rocket.jpg", "cell.png")


def _data_dir() -> Path:
    try:
        import skimage
    except ImportError as error:  # pragma: no cover - scikit-image is an install requirement
        raise RuntimeError("the built-in sample set needs scikit-image (pip install scikit-image)") from error
    return Path(skimage.__file__).resolve().parent / "data"


def _load(name: str, max_side: int) -> torch.Tensor:
    image = read_image(_data_dir() / name)
    h, w = image.shape[1:]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="area")[0]
    return image


def builtin_images(split: str, *, max_side: int = 512) -> tuple[list[str], list[torch.Tensor]]:
    """(names, images) of the ``"train"`` or ``"test"`` split, images float32 [3, H, W]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = TRAIN_FILES if split == "train" else TEST_FILES
    return [Path(f).stem for f in files], [_load(f, max_side) for f in files]
