"""Bytes kept for backward, counted on any device.

``saved_bytes`` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the
storages of the tensors that autograd saves for backward: each storage once (two views of one
buffer count once), skipping the parameters and the input, which exist whatever the implementation.
The same graph saves the same tensors on a GPU, so the count is device-independent; it misses
buffers a kernel keeps outside autograd (none in this library).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_bytes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages saved for backward by ``forward(x)``, other than those of
    ``x`` and of the tensors in ``exclude`` (the parameters)."""
    skipped = {t.untyped_storage().data_ptr() for t in (x, *exclude)}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skipped and storage.nbytes():
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x)
    # The graph (hence every saved storage) is alive until y goes, so no address was reused.
    total = sum(kept.values())
    del y
    return total
