"""Atomic, checksummed checkpoints: model, optimizer, scheduler, step, run configuration and every
RNG state (the global ones and the run's own generators).

File layout: the header line ``MAGIC <sha256 of the rest, hex>\\n``, then the ``torch.save`` bytes
of the payload. Loading recomputes the SHA-256 of those bytes and refuses a file whose digest
differs, so a flipped byte anywhere in the payload (weights, optimizer moments, RNG states) is
reported instead of loaded.

A checkpoint is written to a temporary file ``.<name>.<random>.tmp`` in the same folder and
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so a run killed
mid-write leaves the previous checkpoint intact; the orphan temporary file such a kill leaves is
removed by the next save of that checkpoint. Restoring the RNG states together with the rest
makes a resumed run take exactly the steps an uninterrupted run would have taken.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from moe_restore.errors import UserError

MAGIC = b"moe-restore-checkpoint-v1"
_CHUNK = 1 << 20


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and, where present, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states saved by ``rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_generator_states(state: dict[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore the states of ``generators`` from a loaded checkpoint ``state`` (saved by
    ``save_checkpoint(..., generators=...)`` under the same names)."""
    saved = state.get("generators", {})
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise UserError(f"the checkpoint holds no state for the generator(s) {missing}")
    for name, generator in generators.items():
        generator.set_state(saved[name])


def _orphans(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0, config: dict[str, Any] | None = None,
                    generators: Mapping[str, torch.Generator] | None = None) -> Path:
    """Write a checkpoint atomically, with its checksum; returns its path. ``generators``: the
    run's own random generators, saved by name (see ``set_generator_states``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "config": config or {},
        "rng": rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    # Temporary files of this checkpoint left by a save that was killed (one process saves).
    for orphan in _orphans(path):
        orphan.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(MAGIC + b" " + hashlib.sha256(data).hexdigest().encode() + b"\n")
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (on the CPU), after checking its
    checksum. Raises ``UserError`` for a missing file, a file that is not such a checkpoint and
    a corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    with path.open("rb") as file:
        header = file.readline(len(MAGIC) + 67)
        magic, _, digest = header.rstrip(b"\n").partition(b" ")
        if magic != MAGIC or len(digest) != 64 or not header.endswith(b"\n"):
            raise UserError(f"{str(path)!r} is not a moe-restore checkpoint (no checkpoint header)")
        start = file.tell()
        sha = hashlib.sha256()
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
        if sha.hexdigest().encode() != digest:
            raise UserError(f"checkpoint {str(path)!r} is corrupt: its SHA-256 does not match the one it was "
                            "saved with")
        file.seek(start)
        # weights_only=False: the RNG states hold numpy arrays and Python tuples; the checksum
        # guards against corruption, not tampering: only load checkpoints you trust.
        return torch.load(file, map_location="cpu", weights_only=False)
