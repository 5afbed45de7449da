"""Checks of kernel inputs (NaN scores, the routing's layout) and how each backend refuses.

A Triton launch is sized from host-known shapes only, so the values the kernels index with (the
routing's offsets and assignment ids, NaN counts of the scores) are checked on the device:
``torch._assert_async`` queues the test in the stream instead of reading the tensor back, so the
GPU never stalls and the op can be captured in a CUDA graph. On a GPU a failed check is a
device-side assert: the CUDA runtime reports it as a ``RuntimeError`` at the next
synchronisation, and the CUDA context cannot be used after it (run the same call with
``backend="torch"`` for a ``ValueError`` with the details).

Every check is one boolean, refused by ``refuse_unless`` with one rule for both backends:

* eager mode on the CPU (both backends), and the torch backend in eager mode on any device: the
  flag is read back (the op's one cheap check; on the CPU through ``torch._assert_async``, which
  is synchronous there) and a failure raises ``ValueError`` with the details (which tokens' scores,
  which rule);
* the Triton path on a GPU, and anything under torch.compile: ``torch._assert_async`` in the
  graph, no host read. A compiled call with a refused input raises ``RuntimeError`` (on the CPU,
  at once, with the check's message; on a GPU, a device-side assert at the next synchronisation)
  instead of ``ValueError``.

The kernels that follow a failed check do not run, so a bad input never reaches them.

A routing (T tokens, k choices, E experts, A = T*k assignments) is consistent when

    expert_offsets[0] = 0,  expert_offsets[E] = A,  expert_offsets non-decreasing,
    sorted_assignments a permutation of 0..A-1,
    experts.flat[sorted_assignments[p]] = e  for every p in expert_offsets[e]:expert_offsets[e+1],

which is what every kernel relies on to stay in bounds (and implies 0 <= experts < E).
"""
from __future__ import annotations

from typing import Callable

import torch

ROUTING_RULES = (
    "expert_offsets[0] == 0",
    "expert_offsets[-1] == T*k",
    "expert_offsets is non-decreasing",
    "sorted_assignments holds ids in [0, T*k)",
    "sorted_assignments lists each assignment once",
    "each segment expert_offsets[e]:expert_offsets[e+1] of sorted_assignments holds assignments to expert e",
)


def _holds(ok: torch.Tensor) -> bool:
    """Read the one-element boolean ``ok`` back (on the CPU through the synchronous assert)."""
    if ok.device.type == "cpu":
        try:
            torch._assert_async(ok)
        except RuntimeError:
            return False
        return True
    return bool(ok)


def refuse_unless(ok: torch.Tensor, message: str, backend: str, detail: Callable[[], str] | None = None) -> None:
    """Refuse unless the one-element boolean ``ok`` is true, by the rule of the module docstring:
    ValueError (with ``detail()``, computed only on failure, or ``message``) where the flag is
    read back, else a device-side assert with ``message``."""
    if not torch.compiler.is_compiling() and (backend == "torch" or ok.device.type == "cpu"):
        if not _holds(ok):
            raise ValueError(detail() if detail is not None else message)
        return
    torch._assert_async(ok, message)


def _check_layout(routing) -> None:
    """Host-side checks of the routing's tensors: types, dtypes, shapes and devices."""
    names = ("weights", "experts", "sorted_assignments", "expert_offsets")
    for name in names:
        if not isinstance(getattr(routing, name), torch.Tensor):
            raise TypeError(f"routing.{name} must be a torch.Tensor, got {type(getattr(routing, name)).__name__}")
    for name in names:
        t = getattr(routing, name)
        if name != "weights" and t.dtype != torch.int64:
            raise TypeError(f"routing.{name} must be int64, got {t.dtype}")
        if t.device != routing.experts.device:
            raise ValueError(f"routing.{name} is on {t.device} but routing.experts is on {routing.experts.device}")
    if not routing.weights.is_floating_point():
        raise TypeError(f"routing.weights must be a floating-point tensor, got {routing.weights.dtype}")
    if routing.experts.dim() != 2:
        raise ValueError(f"routing.experts must have shape [T, k], got {tuple(routing.experts.shape)}")
    T, k = routing.experts.shape
    for name, shape in (("weights", (T, k)), ("sorted_assignments", (T * k,)),
                        ("expert_offsets", (routing.num_experts + 1,))):
        if tuple(getattr(routing, name).shape) != shape:
            raise ValueError(f"routing.{name} must have shape {shape} (routing.experts is [T, k] = [{T}, {k}], "
                             f"num_experts = {routing.num_experts}), got {tuple(getattr(routing, name).shape)}")


def routing_rules_held(routing) -> torch.Tensor:
    """[len(ROUTING_RULES)] bool on the routing's device: which rules hold (no host read)."""
    _check_layout(routing)
    offsets, order = routing.expert_offsets, routing.sorted_assignments
    num_assignments = order.numel()
    positions = torch.arange(num_assignments, device=order.device)
    in_range = (order >= 0) & (order < num_assignments)
    safe = order.clamp(0, max(num_assignments - 1, 0))
    # Each id once: scattering the positions by id and reading back through the same ids returns
    # every position only if no two positions share an id (together with the ids in range).
    inverse = torch.full_like(order, -1).scatter_(0, safe, positions)
    # The expert whose segment holds position p: the number of segment ends <= p.
    segment_expert = torch.searchsorted(offsets[1:].contiguous(), positions, right=True)
    chosen = routing.experts.reshape(-1).index_select(0, safe)
    return torch.stack([
        offsets[0] == 0,
        offsets[-1] == num_assignments,
        (offsets.diff() >= 0).all(),
        in_range.all(),
        (inverse.index_select(0, safe) == positions).all(),
        (chosen == segment_expert).all(),
    ])


def _layout_versions(routing) -> tuple[int, ...]:
    """The version counters of the tensors the rules read (any in-place write bumps them)."""
    return tuple(t._version for t in (routing.experts, routing.sorted_assignments, routing.expert_offsets))


def mark_consistent(routing) -> None:
    """Record that ``routing`` is consistent by construction: its layout was computed from its
    experts by the dispatch (``routing.finish_routing``). In eager mode ``check_routing`` then
    skips it for as long as none of its tensors is written in place (their version counters);
    a routing derived from it (``dataclasses.replace``) or built elsewhere is checked. Under
    torch.compile every routing is checked (the check is a few fused ops there)."""
    if not torch.compiler.is_compiling():
        object.__setattr__(routing, "_layout_versions", _layout_versions(routing))


def check_routing(routing, backend: str) -> None:
    """Reject an inconsistent routing before any kernel reads it (see the module docstring); where
    the check is read back, the error names every rule that does not hold. A routing marked by
    ``mark_consistent`` and unchanged since is not checked again."""
    if not torch.compiler.is_compiling() and getattr(routing, "_layout_versions", None) is not None \
            and routing._layout_versions == _layout_versions(routing):
        return
    held = routing_rules_held(routing)

    def broken() -> str:
        return "routing is inconsistent: " + "; ".join(
            f"not {rule}" for rule, ok in zip(ROUTING_RULES, held.tolist()) if not ok)

    refuse_unless(held.all(), "routing is inconsistent: it must satisfy " + "; ".join(ROUTING_RULES), backend,
                  broken)
