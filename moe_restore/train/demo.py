"""``moe-restore demo``: train m2ir-tiny (or mim-dit-tiny) on the built-in sample set, evaluate it
on the held-out images and write a before/after grid and the results table.

A fixed number of steps per model (not a wall-clock budget), so the result is the same on every
machine: ``DEMO_SETTINGS``; for m2ir-tiny ``DEMO_STEPS`` steps of ``DEMO_BATCH`` 64 x 64 patches,
a few minutes on a 2-core CPU, and about as long for mim-dit-tiny's cheaper but more numerous steps.
Output in ``out_dir``: ``grid.png`` (one row per task: degraded | restored | clean),
``results.json`` and ``results.md`` (PSNR / SSIM per task beside the identity baseline) and the
training run in ``run/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_restore.data.image_io import write_image
from moe_restore.data.sources import evaluation_set
from moe_restore.train.evaluate import evaluate, write_results
from moe_restore.train.inference import restore_image
from moe_restore.train.losses import LossWeights
from moe_restore.train.trainer import TrainConfig, train

DEMO_STEPS = 600
DEMO_BATCH = 4
DEMO_PATCH = 64
_CELL = 192  # height of one grid cell in pixels


# Per model, the TrainConfig fields of its demo run.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    # A short run: a high learning rate, a heavy FFT term (high frequencies: noise, rain, blur), a
    # heavy classification term, so that the context tells the degradations apart quickly, and
    # the relative loss at exponent 0.75, so that the mild degradations (noise, blur) are not
    # drowned by the severe ones (haze, low light) in the mixed batches, nor the severe ones
    # starved (exponent 1). The settings tried are in docs/m2ir.md.
    "m2ir-tiny": {"steps": DEMO_STEPS, "batch": DEMO_BATCH, "patch": DEMO_PATCH, "lr": 2e-3, "warmup": 20,
                  "loss": LossWeights(fft=1.0, load_balance=0.01, classification=1.0, relative=0.75)},
    # MiM-DiT's steps are cheap and a diffusion model needs many of them; the classification
    # terms at 0.1, since heavier ones hold the flow loss back; rectified flow has no FFT or
    # relative term; 4 Euler steps, whose samples lie closer to the posterior mean than 8 steps'
    # (the runs behind these choices are in docs/mim_dit.md).
    "mim-dit-tiny": {"steps": 2500, "batch": 8, "patch": DEMO_PATCH, "lr": 2e-3, "warmup": 50,
                     "loss": LossWeights(fft=0.0, load_balance=0.01, classification=0.1),
                     "model_overrides": {"sample_steps": 4}},
}


def demo_config(out_dir: str | Path, *, steps: int | None = None, model: str = "m2ir-tiny") -> TrainConfig:
    """The demo's training run of ``model`` (a key of ``DEMO_SETTINGS``); ``steps`` replaces its
    fixed budget."""
    if model not in DEMO_SETTINGS:
        raise ValueError(f"no demo for model {model!r}; choose from {sorted(DEMO_SETTINGS)}")
    settings = DEMO_SETTINGS[model] | ({} if steps is None else {"steps": steps})
    return TrainConfig(model=model, data="builtin", **settings, eval_every=0, checkpoint_every=settings["steps"],
                       out=str(Path(out_dir) / "run"))


def before_after_grid(model: torch.nn.Module, dataset, *, image_index: int = 0) -> torch.Tensor:
    """[3, H, W] grid: for each task, degraded | restored | clean of one held-out image."""
    rows = []
    per_task = len(dataset) // len(dataset.tasks)
    for task_index in range(len(dataset.tasks)):
        degraded, clean, _ = dataset[task_index * per_task + image_index]
        restored = restore_image(model, degraded)
        cells = [F.interpolate(im[None], size=(_CELL, round(_CELL * im.shape[2] / im.shape[1])), mode="area")[0]
                 for im in (degraded, restored, clean)]
        rows.append(torch.cat(cells, dim=2))
    return torch.cat(rows, dim=1)


def run_demo(out_dir: str | Path = "demo_out", *, steps: int | None = None, model: str = "m2ir-tiny",
             progress: bool = True) -> dict:
    """Train ``model`` (m2ir-tiny or mim-dit-tiny) for ``steps`` (default: its demo budget), evaluate
    and write the demo's outputs; returns the evaluation results."""
    out_dir = Path(out_dir)
    config = demo_config(out_dir, steps=steps, model=model)
    model = train(config, overwrite=True, progress=progress)  # a demo starts afresh in its folder
    dataset = evaluation_set("builtin", config.tasks)
    results = evaluate(model, dataset)
    write_results(results, out_dir)
    write_image(out_dir / "grid.png", before_after_grid(model, dataset))
    return results

