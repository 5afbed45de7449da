"""``moe-restore demo``: train m2ir-tiny (or mim-dit-tiny) on the built-in sample set, evaluate it
on the held-out images and write a before/after grid and the results table.

A fixed number of steps per model (not a wall-clock budget), so the result is the same on every
machine: ``DEMO_SETTINGS``; for m2ir-tiny ``DEMO_STEPS`` steps of ``DEMO_BATCH`` 64 x 64 patches,
a few minutes on a 2-core CPU, and about as long for mim-dit-tiny's cheaper but more numerous steps.
Output in ``out_dir``: ``grid.png`` (one labelled row per held-out image of each task: degraded,
restored, clean, with the PSNR of the first two),
``results.json`` and ``results.md`` (PSNR / SSIM per task beside the identity baseline) and the
training run in ``run/``. The demo restores with ``ChannelOrderAverage`` (the network's outputs
for the three cyclic orders of the colour channels, averaged), so its figures are those of
``evaluate(ChannelOrderAverage(model), ...)``; ``moe-restore eval`` of ``run/checkpoint.pt``
scores the network's single pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe_restore.data.image_io import write_image
from moe_restore.data.sources import evaluation_set
from moe_restore.train.evaluate import evaluate, write_results
from moe_restore.train.inference import restore_image, restorer
from moe_restore.train.metrics import image_metrics
from moe_restore.losses import LossWeights
from moe_restore.train.trainer import TrainConfig, train

DEMO_STEPS = 600
DEMO_BATCH = 4
DEMO_PATCH = 64
_BOX = (160, 240)  # height and width of one image cell of the grid, in pixels
_LABEL_WIDTH = 110  # the grid's first column: task and image name
_TEXT = 18  # height of a line of text in the grid (PIL's default bitmap font)


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


class ChannelOrderAverage(torch.nn.Module):
    """The demo's restorer: ``model`` run on the image in each cyclic order of its colour channels,
    each output put back in the original order, the three averaged:

        g(x) = 1/3 sum_{k=0..2} S^-k f(S^k x),   S: the cyclic shift of the channels (R, G, B) -> (B, R, G)

    g commutes with S (g(S x) = S g(x)), so it favours no channel, and a grey image (S x = x)
    comes back exactly grey: each channel of g(x) is the mean of the three channels of f(x). The
    built-in training patches take their channels in random order, which makes the best restorer
    treat the channels alike, but the demo's 600 steps leave the network a little asymmetric, and
    the low-light head, whose gain is large, shows it as a cast: on the grey held-out image (cell)
    the first model trained on shuffled patches gave R +0.019, G -0.017 against the mean shift
    (magenta; docs/m2ir.md). Three passes of the network per image."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, H, W]: the mean of the restored images of the three channel orders."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape [B, 3, H, W], got {tuple(image.shape)}")
        restore = restorer(self.model)
        return torch.stack([restore(image.roll(k, 1)).roll(-k, 1) for k in range(3)]).mean(0)


def _fit(image: torch.Tensor) -> torch.Tensor:
    """``image`` scaled (area) to fit a ``_BOX`` cell, centred on a grey background."""
    box_h, box_w = _BOX
    scale = min(box_h / image.shape[1], box_w / image.shape[2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
    cell = torch.full((3, box_h, box_w), 0.3)
    top, left = (box_h - size[0]) // 2, (box_w - size[1]) // 2
    cell[:, top:top + size[0], left:left + size[1]] = F.interpolate(image[None], size=size, mode="area")[0]
    return cell


def before_after_grid(model: torch.nn.Module, dataset) -> torch.Tensor:
    """[3, H, W] labelled grid of every held-out image of ``dataset``: a header row (task / image,
    degraded, restored, clean), then one row per image with its task and name, the degraded input
    and the restored image each with its PSNR against the clean image (the restored one with its
    gain over the input), and the clean image."""
    from PIL import Image, ImageDraw

    box_h, box_w = _BOX
    width, height = _LABEL_WIDTH + 3 * box_w, _TEXT + len(dataset) * (box_h + _TEXT)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("degraded (input)", "restored", "clean (target)")):
        draw.text((_LABEL_WIDTH + column * box_w + 4, 3), title, fill="black")
    draw.text((4, 3), "task / image", fill="black")
    for index in range(len(dataset)):
        degraded, clean, _ = dataset[index]
        restored = restore_image(model, degraded).clamp(0, 1)
        before, after = (image_metrics(image, clean)["psnr"] for image in (degraded, restored))
        top = _TEXT + index * (box_h + _TEXT)
        task, _, name = dataset.name(index).partition("/")
        draw.text((4, top + box_h // 2 - 8), task, fill="black")
        draw.text((4, top + box_h // 2 + 4), name, fill="dimgray")
        captions = (f"PSNR {before:.2f} dB", f"PSNR {after:.2f} dB ({after - before:+.2f})", "")
        for column, (image, caption) in enumerate(zip((degraded, restored, clean), captions)):
            cell = (_fit(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(cell), (_LABEL_WIDTH + column * box_w, top))
            draw.text((_LABEL_WIDTH + column * box_w + 4, top + box_h + 3), caption, fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def run_demo(out_dir: str | Path = "demo_out", *, steps: int | None = None, model: str = "m2ir-tiny",
             progress: bool = True) -> dict:
    """Train ``model`` (m2ir-tiny or mim-dit-tiny) for ``steps`` (default: its demo budget), evaluate
    and write the demo's outputs; returns the evaluation results."""
    config = demo_config(out_dir, steps=steps, model=model)
    network = train(config, overwrite=True, progress=progress)  # a demo starts afresh in its folder
    return write_demo_outputs(network, config.tasks, out_dir)


def write_demo_outputs(model: torch.nn.Module, tasks: tuple[str, ...], out_dir: str | Path) -> dict:
    """Evaluate a trained ``model`` through ``ChannelOrderAverage`` on the built-in held-out images
    degraded by each of ``tasks``; write ``results.{json,md}`` and ``grid.png`` into ``out_dir``
    and return the results (``run_demo``'s second half, also for a checkpoint of a demo run)."""
    out_dir = Path(out_dir)
    restorer_model = ChannelOrderAverage(model)
    dataset = evaluation_set("builtin", tasks)
    results = evaluate(restorer_model, dataset)
    write_results(results, out_dir)
    write_image(out_dir / "grid.png", before_after_grid(restorer_model, dataset))
    return results

