"""Datasets of (degraded, clean, task index) triples, images as float32 [3, H, W] in [0, 1].

* ``SyntheticDataset``: degrades clean images on the fly. Item ``i`` is a pure function of
  (``seed``, ``i``): task ``tasks[i % len(tasks)]`` (task-balanced), a random image, a random
  ``patch`` x ``patch`` crop, random flips, a random strength and degradation seed, and with
  ``shuffle_channels`` a random order of the colour channels. A training run that asks for items
  ``step * batch + j`` therefore resumes bit-exactly from any step.
* ``PairedFolderDataset``: real benchmarks. Either one task's ``input/`` and ``target/`` folders
  with matching file names (stems), or the all-in-one layout ``ROOT/{Train,Test}/<Task>/`` with
  ``<Task>`` among Denoise, Derain, Dehaze, Deblur, Enhance, each holding ``input/`` and
  ``target/``; a Denoise folder with clean images only (``target/`` or the images directly, as
  in BSD68/WED-based sets) gets Gaussian noise of ``denoise_sigma`` with a fixed per-file seed.
* ``FixedDegradedDataset``: held-out evaluation pairs: each clean image under each task at a
  fixed strength and seed, so every evaluation sees the same inputs.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from moe_restore.data.degradations import NOISE_STRENGTH, degrade, parse_task
from moe_restore.data.image_io import list_images, read_image
from moe_restore.errors import UserError

AIO_TASK_FOLDERS = {"Denoise": "noise", "Derain": "rain", "Dehaze": "haze", "Deblur": "blur", "Enhance": "lowlight"}
# Evaluation strength of each single degradation (noise: sigma 25, the 5-task benchmark level).
EVAL_STRENGTH = {"noise": NOISE_STRENGTH[25], "rain": 0.5, "haze": 0.5, "blur": 0.4, "lowlight": 0.5}


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of task names (single or composite degradations)."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one degradation")
    for task in tasks:
        parse_task(task)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat, got {list(tasks)}")
    return tasks


def eval_strength(task: str) -> float:
    """The fixed evaluation strength of a task (a composite: the mean of its parts)."""
    parts = parse_task(task)
    return sum(EVAL_STRENGTH[p] for p in parts) / len(parts)


def _task_seed(task: str) -> int:
    return zlib.crc32(task.encode())


def _random_crop_flip(images: torch.Tensor, patch: int, gen: torch.Generator) -> torch.Tensor:
    """One random aligned ``patch`` crop of [N, 3, H, W], flipped left-right and up-down each
    with probability 1/2."""
    h, w = images.shape[2:]
    top = int(torch.randint(h - patch + 1, (), generator=gen))
    left = int(torch.randint(w - patch + 1, (), generator=gen))
    crop = images[:, :, top:top + patch, left:left + patch]
    flips = torch.rand(2, generator=gen)
    if flips[0] < 0.5:
        crop = crop.flip(3)
    if flips[1] < 0.5:
        crop = crop.flip(2)
    return crop.contiguous()


class SyntheticDataset(Dataset):
    """Random patches of clean images, degraded on the fly; see the module docstring."""

    def __init__(self, images: Sequence[torch.Tensor], tasks: Sequence[str], *, patch: int,
                 length: int, seed: int = 0, shuffle_channels: bool = False):
        if not images:
            raise ValueError("images must hold at least one clean image")
        small = [tuple(im.shape[1:]) for im in images if min(im.shape[1:]) < patch]
        if small:
            raise UserError(f"patch={patch} is larger than image(s) of size {small}")
        self.images, self.tasks, self.patch, self.length, self.seed = list(images), check_tasks(tasks), patch, length, seed
        self.shuffle_channels = shuffle_channels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        task_index = index % len(self.tasks)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = self.images[int(torch.randint(len(self.images), (), generator=gen))]
        clean = _random_crop_flip(image[None], self.patch, gen)[0]
        strength = float(torch.rand((), generator=gen))
        degradation_seed = int(torch.randint(2**31 - 1, (), generator=gen))
        if self.shuffle_channels:
            # Every degradation treats the three channels alike (grey airlight and rain streaks, one
            # blur kernel, one gamma), so a pair with its channels permuted is as valid as the
            # original; drawing the order at random makes the mean colour of the training patches
            # grey, which leaves the network no colour prior to add to what it restores.
            clean = clean[torch.randperm(3, generator=gen)]
        degraded = degrade(self.tasks[task_index], clean, degradation_seed, strength)
        return degraded, clean, task_index


class FixedDegradedDataset(Dataset):
    """Every (task, image) pair degraded once at the task's evaluation strength, fixed seed."""

    def __init__(self, images: Sequence[torch.Tensor], tasks: Sequence[str], *, names: Sequence[str] | None = None):
        self.images, self.tasks = list(images), check_tasks(tasks)
        self.names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.tasks) * len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        task_index, image_index = divmod(index, len(self.images))
        task, clean = self.tasks[task_index], self.images[image_index]
        degraded = degrade(task, clean, _task_seed(task) + image_index, eval_strength(task))
        return degraded, clean, task_index

    def name(self, index: int) -> str:
        task_index, image_index = divmod(index, len(self.images))
        return f"{self.tasks[task_index]}/{self.names[image_index]}"


def _pairs(input_dir: Path, target_dir: Path) -> list[tuple[Path, Path]]:
    inputs = {p.stem: p for p in list_images(input_dir)}
    targets = {p.stem: p for p in list_images(target_dir)}
    missing = sorted(set(inputs) ^ set(targets))
    if missing:
        raise UserError(f"{input_dir} and {target_dir} must hold images of the same names; "
                         f"unmatched: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if not inputs:
        raise UserError(f"no images in {input_dir}")
    return [(inputs[s], targets[s]) for s in sorted(inputs)]


class PairedFolderDataset(Dataset):
    """Degraded/clean pairs from folders; see the module docstring for the layouts."""

    def __init__(self, root: str | Path, *, split: str = "Test", tasks: Sequence[str] | None = None,
                 denoise_sigma: int = 25):
        root = Path(root)
        if denoise_sigma not in NOISE_STRENGTH:
            raise ValueError(f"denoise_sigma must be one of {sorted(NOISE_STRENGTH)}, got {denoise_sigma}")
        self.denoise_sigma = denoise_sigma
        # entries: (input path or None for synthesized noise, target path, task)
        self.entries: list[tuple[Path | None, Path, str]] = []
        if (root / "input").is_dir() and (root / "target").is_dir():
            # One task's folders: the task is named by ``tasks`` (one name) or by the folder.
            task = check_tasks(tasks)[0] if tasks is not None and len(tasks) == 1 else root.name
            self.entries = [(i, t, task) for i, t in _pairs(root / "input", root / "target")]
        elif (root / split).is_dir():
            self._scan_all_in_one(root / split)
            if tasks is not None:
                wanted = check_tasks(tasks)
                self.entries = [e for e in self.entries if e[2] in wanted]
        else:
            raise UserError(f"data folder {str(root)!r} has neither input/ + target/ nor a {split}/ folder "
                             f"with task folders {list(AIO_TASK_FOLDERS)}")
        if not self.entries:
            raise UserError(f"no image pairs for tasks {tasks} under {str(root)!r}")
        self.tasks = tuple(sorted({task for _, _, task in self.entries}, key=self._task_order))

    @staticmethod
    def _task_order(task: str) -> int:
        order = list(AIO_TASK_FOLDERS.values())
        return order.index(task) if task in order else len(order)

    def _scan_all_in_one(self, split_dir: Path) -> None:
        for folder, task in AIO_TASK_FOLDERS.items():
            task_dir = split_dir / folder
            if not task_dir.is_dir():
                continue
            if (task_dir / "input").is_dir():
                self.entries += [(i, t, task) for i, t in _pairs(task_dir / "input", task_dir / "target")]
            elif task == "noise":
                clean_dir = task_dir / "target" if (task_dir / "target").is_dir() else task_dir
                self.entries += [(None, t, task) for t in list_images(clean_dir)]
            else:
                raise UserError(f"{task_dir} must hold input/ and target/ folders")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        input_path, target_path, task = self.entries[index]
        target = read_image(target_path)
        if input_path is None:
            degraded = degrade("noise", target, zlib.crc32(target_path.name.encode()), NOISE_STRENGTH[self.denoise_sigma])
        else:
            degraded = read_image(input_path)
            if degraded.shape != target.shape:
                raise UserError(f"{input_path} is {tuple(degraded.shape[1:])} but its target "
                                 f"{target_path} is {tuple(target.shape[1:])}")
        return degraded, target, self.tasks.index(task)

    def name(self, index: int) -> str:
        return f"{self.entries[index][2]}/{self.entries[index][1].name}"


class PairedPatchDataset(Dataset):
    """Training patches of a ``PairedFolderDataset``: item ``i`` takes task ``i % len(tasks)``
    (task-balanced), a random pair of that task, a random aligned crop and random flips, all a
    pure function of (``seed``, ``i``)."""

    def __init__(self, pairs: PairedFolderDataset, *, patch: int, length: int, seed: int = 0):
        self.pairs, self.patch, self.length, self.seed = pairs, patch, length, seed
        self.tasks = pairs.tasks
        self.by_task = [[i for i, e in enumerate(pairs.entries) if e[2] == task] for task in self.tasks]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        task_index = index % len(self.tasks)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        members = self.by_task[task_index]
        degraded, clean, _ = self.pairs[members[int(torch.randint(len(members), (), generator=gen))]]
        if min(clean.shape[1:]) < self.patch:
            raise UserError(f"patch={self.patch} is larger than a {tuple(clean.shape[1:])} training pair")
        pair = _random_crop_flip(torch.stack([degraded, clean]), self.patch, gen)
        return pair[0], pair[1], task_index
