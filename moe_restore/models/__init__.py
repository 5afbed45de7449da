"""Named network configurations and ``build(name, **overrides)``.

================  ====  ============  ==========  ==========  =======  ===========
name              C     blocks        refinement  experts     d_state  context P
================  ====  ============  ==========  ==========  =======  ===========
m2ir-base         48    4, 6, 6, 8    4           6, top-2    16       512
m2ir-small        32    2, 3, 3, 4    2           6, top-2    8        128
m2ir-tiny         16    1, 1, 1, 1    1           4, top-2    4        32
================  ====  ============  ==========  ==========  =======  ===========

All use 4 scan directions except m2ir-tiny (2: row and reversed row) and scan expansion 2 except
m2ir-tiny (1). m2ir-tiny also has one output head per degradation with a 9 x 9 input filter
(``degradation_heads``, ``input_filter``: docs/m2ir.md); the others keep the paper's single head.

m2ir-base is the paper's scale (its P = 512 also accepts DA-CLIP features); m2ir-tiny trains on
a CPU in minutes.

================  ======  =====  =====  =====  ==============================  =========
name              hidden  depth  heads  patch  nested FFN                      context P
================  ======  =====  =====  =====  ==============================  =========
mim-dit-tiny      64      3      4      4      G=5 x E=4, top-2 x top-1        32
mim-dit-s         384     12     6      2      G=5 x E=4, top-2 x top-1        64
mim-dit-b         768     12     12     2      G=5 x E=4, top-2 x top-1        64
================  ======  =====  =====  =====  ==============================  =========

MiM-DiT configurations build a randomly initialised DiT; ``MiMDiT.from_pretrained_dit`` upcycles
a pretrained one instead (docs/mim_dit.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from moe_restore.errors import UserError
from moe_restore.models.m2ir import M2IR, M2IRConfig
from moe_restore.models.mim_dit import MiMDiT, MiMDiTConfig

_REGISTRY: dict[str, tuple[type[nn.Module], Any]] = {
    "m2ir-base": (M2IR, M2IRConfig()),
    "m2ir-small": (M2IR, M2IRConfig(dim=32, blocks=(2, 3, 3, 4), refinement=2, d_state=8, context_dim=128,
                                    encoder_width=24)),
    "m2ir-tiny": (M2IR, M2IRConfig(dim=16, blocks=(1, 1, 1, 1), refinement=1, heads=(1, 1, 2, 2),
                                   ffn_expansion=2.0, num_experts=4, expert_expansion=2.0, d_state=4,
                                   expand=1, directions=2, context_dim=32, encoder_width=16,
                                   degradation_heads=True, input_filter=9)),
    "mim-dit-tiny": (MiMDiT, MiMDiTConfig(hidden=64, depth=3, heads=4, patch=4, sample_size=16, context_dim=32,
                                          encoder_width=16)),
    "mim-dit-s": (MiMDiT, MiMDiTConfig(hidden=384, depth=12, heads=6, patch=2, sample_size=32)),
    "mim-dit-b": (MiMDiT, MiMDiTConfig(hidden=768, depth=12, heads=12, patch=2, sample_size=32)),
}


def names() -> list[str]:
    """The registered configuration names."""
    return sorted(_REGISTRY)


def config(name: str, **overrides: Any):
    """The configuration of ``name`` with ``overrides`` applied."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose from {names()}")
    base = _REGISTRY[name][1]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {name!r}; fields are {sorted(fields)}")
    # Lists from JSON (a checkpoint's config) become the tuples the dataclass declares.
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(base, **overrides)


def build(name: str, **overrides: Any) -> nn.Module:
    """The network ``name`` (see the table above) with configuration ``overrides``."""
    settings = config(name, **overrides)
    return _REGISTRY[name][0](settings)


__all__ = ["M2IR", "M2IRConfig", "MiMDiT", "MiMDiTConfig", "build", "config", "names"]
