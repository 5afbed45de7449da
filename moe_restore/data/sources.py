"""From a ``--data`` argument to training and evaluation datasets.

``data`` is ``"builtin"`` or a folder:

==========================  ==================================  ===================================
data                        training patches                    evaluation pairs
==========================  ==================================  ===================================
builtin                     synthetic, scikit-image train set,  fixed degradations of the test set
                            colour channels in random order     (downscaled to 256 px)
DIR/Train, DIR/Test (AIO)   crops of the Train pairs            the Test pairs
DIR/input, DIR/target       crops of the pairs                  the pairs
DIR of clean images         synthetic, 9 of every 10 images     fixed degradations of every 10th
                            (all but the last if fewer than 10) image (the only one, if just one)
==========================  ==================================  ===================================
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from moe_restore.data.builtin import builtin_images
from moe_restore.data.datasets import (FixedDegradedDataset, PairedFolderDataset, PairedPatchDataset,
                                       SyntheticDataset, check_tasks)
from moe_restore.data.image_io import list_images, read_image
from moe_restore.errors import UserError

_HELD_OUT_EVERY = 10


def _layout(data: str) -> str:
    if data == "builtin":
        return "builtin"
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"data must be 'builtin' or an existing folder, got {data!r}")
    if (root / "Train").is_dir() or (root / "Test").is_dir():
        return "all-in-one"
    if (root / "input").is_dir() and (root / "target").is_dir():
        return "paired"
    return "clean"


def _clean_split(data: str, split: str) -> tuple[list[str], list]:
    paths = list_images(data)
    if not paths:
        raise UserError(f"no images in {data!r}")
    if len(paths) >= 2:
        # Every 10th image is held out; a folder of fewer than 10 holds out its last one.
        held_out = set(range(_HELD_OUT_EVERY - 1, len(paths), _HELD_OUT_EVERY)) or {len(paths) - 1}
        paths = [p for i, p in enumerate(paths) if (i in held_out) == (split == "test")]
    return [p.stem for p in paths], [read_image(p) for p in paths]


def training_set(data: str, tasks: Sequence[str], *, patch: int, length: int, seed: int) -> Dataset:
    """Training patches (each item a pure function of its index); see the module table."""
    tasks = check_tasks(tasks)
    layout = _layout(data)
    if layout in ("builtin", "clean"):
        _, images = builtin_images("train") if layout == "builtin" else _clean_split(data, "train")
        # The built-in photographs are warm (mean RGB 0.48 / 0.40 / 0.37, retina and coffee red):
        # a network trained on them as they are learns to push what it restores towards red (a
        # grey hazy image came back 0.03-0.04 redder than blue). A user's own folder keeps its colours.
        return SyntheticDataset(images, tasks, patch=patch, length=length, seed=seed,
                                shuffle_channels=layout == "builtin")
    pairs = PairedFolderDataset(data, split="Train", tasks=tasks if layout == "all-in-one" else None)
    return PairedPatchDataset(pairs, patch=patch, length=length, seed=seed)


def evaluation_set(data: str, tasks: Sequence[str]) -> Dataset:
    """Held-out evaluation pairs with a ``name(index)`` and a ``tasks`` tuple; see the module table."""
    tasks = check_tasks(tasks)
    layout = _layout(data)
    if layout in ("builtin", "clean"):
        # The built-in held-out photographs are evaluated at 256 px on their longer side: one
        # network pass each, so that the CPU demo evaluates in seconds.
        names, images = builtin_images("test", max_side=256) if layout == "builtin" else _clean_split(data, "test")
        return FixedDegradedDataset(images, tasks, names=names)
    return PairedFolderDataset(data, split="Test", tasks=tasks if layout == "all-in-one" else None)
