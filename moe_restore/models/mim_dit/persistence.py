"""MiM-DiT on disk, the model's ``save_pretrained`` / ``from_pretrained``: ``mim_dit.json`` (the
MiM-DiT and DiT configurations) and ``mim_dit.pt`` (the weights, without a VAE's)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from moe_restore.layers.experts import shared_banks_to_dense

WEIGHTS = "mim_dit.pt"
CONFIG = "mim_dit.json"


def save_pretrained(model, directory: str | Path) -> None:
    """Write the configuration (MiM-DiT and DiT) and the weights to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"mim_dit": dataclasses.asdict(model.config), "dit": dict(model.dit.config)}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
    torch.save(state, directory / WEIGHTS)


def from_pretrained(cls, directory: str | Path, *, vae: nn.Module | None = None):
    """Rebuild a model written by ``save_pretrained``."""
    from .model import MiMDiTConfig, dit_class

    directory = Path(directory)
    meta = json.loads((directory / CONFIG).read_text())
    dit_config = {k: v for k, v in meta["dit"].items() if not k.startswith("_")}
    model = cls(MiMDiTConfig(**meta["mim_dit"]), dit=dit_class().from_config(dit_config), vae=vae)
    state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(shared_banks_to_dense(model, state), strict=False)
    missing = [k for k in missing if not k.startswith("vae.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model
