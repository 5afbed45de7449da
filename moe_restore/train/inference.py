"""Loading a trained restorer and applying it to images of any size.

Large images are restored in overlapping tiles: tile i covers [s_i, s_i + T) along each axis, with
starts a stride T - O apart and the last tile flush with the border. Each tile's output is
weighted by a ramp that rises linearly over the O overlap pixels from its inner edges (a window
that is 1 in the interior), and the image is sum(w_i y_i) / sum(w_i): seams blend smoothly, and an
image no larger than one tile is restored in one pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from moe_restore.errors import UserError
from moe_restore.layers.experts import shared_banks_to_dense
from moe_restore.train.checkpoint import load_checkpoint


def pipeline_backend(backend: str | None, device: torch.device | str) -> str | None:
    """The kernel backend the pipeline uses: ``backend`` if given, else the Triton kernels on
    CUDA and the torch backend on the CPU (even where the Triton interpreter could run: it is a
    test vehicle, far too slow to train or restore images with)."""
    if backend is not None:
        from moe_restore.kernels._backend import resolve_backend

        try:
            resolve_backend(backend, torch.device(device))  # refused here, not at the first forward
        except (RuntimeError, ValueError) as error:
            raise UserError(f"--backend {backend} on {device}: {error}") from None
        return backend
    return "torch" if torch.device(device).type == "cpu" else None


def load_model(checkpoint: str | Path, *, device: torch.device | str = "cpu", backend: str | None = None,
               sample_steps: int | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, run configuration) from a training checkpoint.
    ``sample_steps`` sets the sampling steps of a network that samples (MiM-DiT); the others
    ignore it."""
    from moe_restore.models import build

    if sample_steps is not None and (isinstance(sample_steps, bool) or not isinstance(sample_steps, int)
                                     or sample_steps < 1):
        raise UserError(f"sample_steps must be a positive int, got {sample_steps!r}")
    state = load_checkpoint(checkpoint)
    run = state["config"]
    if not {"model", "model_config"} <= set(run):
        raise UserError(f"checkpoint {str(checkpoint)!r} holds no run configuration (not written by train)")
    overrides = {"backend": pipeline_backend(backend, device)}
    if sample_steps is not None and "sample_steps" in run["model_config"]:
        overrides["sample_steps"] = sample_steps
    try:
        model = build(run["model"], **{**run["model_config"], **overrides})
    except (TypeError, ValueError) as error:  # a configuration of another version of moe-restore
        raise UserError(f"checkpoint {str(checkpoint)!r}: its model configuration does not fit this version of "
                        f"moe-restore ({error})") from None
    non_finite = [name for name, t in state["model"].items() if t.is_floating_point() and not t.isfinite().all()]
    if non_finite:
        raise UserError(f"checkpoint {str(checkpoint)!r} holds NaN or infinite weights in {len(non_finite)} "
                        f"tensor(s), e.g. {non_finite[0]!r} (the run diverged): use an earlier checkpoint")
    try:
        model.load_state_dict(shared_banks_to_dense(model, state["model"]))
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        first = str(error).strip().splitlines()
        raise UserError(f"checkpoint {str(checkpoint)!r}: its weights do not fit a {run['model']} of its saved "
                        f"configuration ({first[1].strip() if len(first) > 1 else first[0]})") from error
    return model.to(device).eval(), run


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weight of a tile: rising over ``overlap`` px at inner edges, else 1."""
    weight = torch.ones(length)
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if overlap and not at_start:
        weight[:overlap] = ramp
    if overlap and not at_end:
        weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def restored_path(out: str | Path, source: str | Path, image_format: str | None = None) -> Path:
    """The file a restored ``source`` image is written to in folder ``out``: the same stem, as
    ``image_format`` ("png", "jpg"; None: the input's own format where it is PNG or JPEG, else PNG)."""
    source = Path(source)
    target = Path(out) / (source.stem + (f".{image_format}" if image_format else source.suffix.lower()))
    return target if target.suffix in (".png", ".jpg", ".jpeg") else target.with_suffix(".png")


def restore_targets(sources: list[Path], out: str | Path, image_format: str | None = None) -> dict[Path, Path]:
    """Output path of each input (``restored_path``). Refuses two inputs that would share an output, or an output
    that would overwrite an input."""
    targets: dict[Path, Path] = {}
    for source in sources:
        target = restored_path(out, source, image_format)
        if not source.is_file():
            raise UserError(f"input {str(source)!r} does not exist or is not a file")
        if source in targets:
            raise UserError(f"input {str(source)!r} is given twice")
        clash = next((s for s, t in targets.items() if t.resolve() == target.resolve()), None)
        if clash is not None:
            raise UserError(f"inputs {str(clash)!r} and {str(source)!r} would both be written to {str(target)!r}: "
                            "restore them into different --out folders")
        targets[source] = target
    overwritten = [s for s, t in targets.items() if t.resolve() in {x.resolve() for x in targets}]
    if overwritten:
        raise UserError(f"restoring {str(overwritten[0])!r} into {str(out)!r} would overwrite an input: "
                        "choose another --out folder")
    return targets


def restorer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network's restoration function: ``restore`` where it has one (MiM-DiT samples), else
    its forward (M2IR)."""
    return getattr(model, "restore", None) or model


@torch.no_grad()
def restore_image(model: nn.Module, image: torch.Tensor, *, tile: int | None = 256, overlap: int = 32) -> torch.Tensor:
    """Restore one [3, H, W] image in [0, 1] (tiled when larger than ``tile``; None: one pass).
    Returns [3, H, W] clipped to [0, 1] on the CPU."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape [3, H, W], got {tuple(image.shape)}")
    if tile is not None and not 0 <= overlap < tile:
        raise UserError(f"overlap must be in [0, tile={tile}), got {overlap}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    h, w = image.shape[1:]
    if tile is None or (h <= tile and w <= tile):
        return restorer(model)(image[None].to(device)).float()[0].clamp(0, 1).cpu()
    output = torch.zeros(3, h, w)
    total = torch.zeros(1, h, w)
    rows, cols = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for top in rows:
        for left in cols:
            piece = image[:, top:top + tile, left:left + tile]
            restored = restorer(model)(piece[None].to(device)).float()[0].cpu()
            ph, pw = piece.shape[1:]
            weight = (_ramp(ph, overlap, top == rows[0], top == rows[-1])[:, None]
                      * _ramp(pw, overlap, left == cols[0], left == cols[-1])[None, :])
            output[:, top:top + ph, left:left + pw] += restored * weight
            total[:, top:top + ph, left:left + pw] += weight
    return (output / total).clamp(0, 1)
