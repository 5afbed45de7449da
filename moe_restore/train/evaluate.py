"""Evaluation: PSNR / SSIM (RGB and Y) per task and on average, beside the identity baseline
(the degraded input scored against the target), written as JSON and Markdown."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.utils.data import Dataset

from moe_restore.train.inference import restore_image
from moe_restore.train.metrics import image_metrics

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")


def evaluate(model: nn.Module, dataset: Dataset, *, tile: int | None = 256) -> dict[str, Any]:
    """Scores of ``model`` and of the identity on every pair of ``dataset``.

    Returns ``{"tasks": {task: {"model": {metric: mean}, "identity": {...}, "count": n}},
    "average": {"model": ..., "identity": ...}}``; the average is the mean over tasks.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: {"model": defaultdict(float),
                                                                       "identity": defaultdict(float)})
    counts: dict[str, int] = defaultdict(int)
    for index in range(len(dataset)):
        degraded, clean, task_index = dataset[index]
        task = dataset.tasks[task_index]
        restored = restore_image(model, degraded, tile=tile)
        for which, image in (("model", restored), ("identity", degraded)):
            for metric, value in image_metrics(image, clean).items():
                sums[task][which][metric] += value
        counts[task] += 1
    model.train(was_training)
    tasks = {task: {which: {m: sums[task][which][m] / counts[task] for m in METRICS} for which in ("model", "identity")}
             | {"count": counts[task]} for task in sums}
    average = {which: {m: sum(t[which][m] for t in tasks.values()) / len(tasks) for m in METRICS}
               for which in ("model", "identity")}
    return {"tasks": tasks, "average": average}


def tasks_not_beating_identity(results: dict[str, Any]) -> list[str]:
    """The tasks of ``evaluate``'s ``results`` on which the model's mean PSNR does not exceed the
    identity baseline's."""
    return [task for task, row in results["tasks"].items() if row["model"]["psnr"] <= row["identity"]["psnr"]]


def markdown_table(results: dict[str, Any]) -> str:
    """PSNR / SSIM per task and on average, model beside identity."""
    lines = ["| task | images | PSNR (dB) | SSIM | PSNR-Y (dB) | SSIM-Y | identity PSNR | identity SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    rows = list(results["tasks"].items()) + [("**average**", {**results["average"], "count": ""})]
    for task, row in rows:
        m, i = row["model"], row["identity"]
        lines.append(f"| {task} | {row['count']} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['psnr_y']:.2f} | "
                     f"{m['ssim_y']:.4f} | {i['psnr']:.2f} | {i['ssim']:.4f} |")
    return "\n".join(lines) + "\n"


def comparison_table(results_by_name: dict[str, dict[str, Any]]) -> str:
    """PSNR / SSIM per task of several models side by side, after the identity baseline."""
    names = list(results_by_name)
    first = results_by_name[names[0]]
    lines = ["| task | identity | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows = [(task, lambda r, t=task: r["tasks"][t]) for task in first["tasks"]]
    rows.append(("**average**", lambda r: r["average"]))
    for task, pick in rows:
        cells = [f"{pick(r)['model']['psnr']:.2f} / {pick(r)['model']['ssim']:.4f}" for r in results_by_name.values()]
        identity = pick(first)["identity"]
        lines.append(f"| {task} | {identity['psnr']:.2f} / {identity['ssim']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_folder(out: str | Path, index: int, count: int, model_name: str) -> Path:
    """Where the results of checkpoint ``index`` of ``count`` evaluated together go: ``out`` for
    a single checkpoint, ``out/<index>-<model_name>`` for each of several."""
    return Path(out) if count == 1 else Path(out) / f"{index}-{model_name}"


def write_results(results: dict[str, Any], out_dir: str | Path, *, stem: str = "results") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown_table(results))
    return json_path, md_path
