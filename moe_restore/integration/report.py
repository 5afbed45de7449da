"""What ``replace_moe`` and ``upcycle_ffn`` return: the model and a list of what changed and what
was left alone (with the reason), plus the module-tree walk and the argument checks both use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from moe_restore.kernels import BACKENDS


@dataclass(frozen=True)
class Change:
    """Module ``name`` (its qualified name in the model; "" for the model itself) was a ``before``
    and is now a ``after``; ``detail`` says how the weights and the rule were carried over."""

    name: str
    before: str
    after: str
    detail: str


@dataclass(frozen=True)
class Skip:
    """Module ``name`` of class ``kind`` looked like a candidate but was left unchanged, because ``reason``."""

    name: str
    kind: str
    reason: str


@dataclass
class IntegrationReport:
    """The model after the swap (the same object, changed in place, unless the model itself was
    swapped), what was ``replaced`` and what was ``skipped``; ``note`` says why when neither lists
    anything (what was looked for)."""

    model: nn.Module
    replaced: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    note: str = ""

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {self.note}"] if self.note else []
        lines += [f"  replaced {c.name or '<model>'}: {c.before} -> {c.after} ({c.detail})" for c in self.replaced]
        lines += [f"  skipped  {s.name or '<model>'}: {s.kind}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


class NotConvertible(Exception):
    """A candidate module that cannot be swapped; the message is the reason for the report."""


def swap_modules(model: nn.Module, convert: Callable[[str, nn.Module], tuple[nn.Module, str] | None]
                 ) -> IntegrationReport:
    """Walk ``model`` top-down; ``convert(name, module)`` returns (replacement, detail), None (not
    a candidate: look inside it) or raises NotConvertible (a candidate left alone). The children
    of a swapped or skipped module are not visited."""
    report = IntegrationReport(model)

    def visit(name: str, module: nn.Module, put: Callable[[nn.Module], None]) -> None:
        try:
            converted = convert(name, module)
        except NotConvertible as why:
            report.skipped.append(Skip(name, type(module).__name__, str(why)))
            return
        if converted is None:
            for child_name, child in list(module.named_children()):
                visit(f"{name}.{child_name}" if name else child_name, child, _setter(module, child_name))
            return
        new, detail = converted
        put(new)
        report.replaced.append(Change(name, type(module).__name__, type(new).__name__, detail))

    def put_root(new: nn.Module) -> None:
        report.model = new

    visit("", model, put_root)
    return report


def _setter(parent: nn.Module, child_name: str) -> Callable[[nn.Module], None]:
    return lambda new: setattr(parent, child_name, new)


def check_arguments(model: object, backend: object) -> None:
    """The arguments every entry point takes: a module, and a backend name (or None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
