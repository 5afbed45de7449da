"""Degradation synthesis, image files, datasets and the built-in sample set."""
from moe_restore.data.builtin import builtin_images
from moe_restore.data.datasets import (FixedDegradedDataset, PairedFolderDataset, PairedPatchDataset,
                                       SyntheticDataset, check_tasks)
from moe_restore.data.degradations import DEGRADATIONS, SINGLE_DEGRADATIONS, degrade, parse_task
from moe_restore.data.image_io import list_images, read_image, write_image

__all__ = [
    "DEGRADATIONS", "SINGLE_DEGRADATIONS", "FixedDegradedDataset", "PairedFolderDataset", "PairedPatchDataset",
    "SyntheticDataset", "builtin_images", "check_tasks", "degrade", "list_images", "parse_task",
    "read_image", "write_image",
]
