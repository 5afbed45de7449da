"""Top-K routing: router scores, expert choice and the dispatch layout of the assignments.

For logits [T, E] and k = top_k experts per token (token t's j-th choice is assignment a = t*k + j):

    l[t]        = logits[t] rounded to float32 (all arithmetic below in float32)
    p[t]        = softmax(l[t]) ("softmax")  or  sigmoid(l[t]) ("sigmoid")
    experts[t]  = indices of the k largest l[t] (so of p[t]: both scorings are monotone), ties to
                  the lower index; ranking the logits means no underflow of p changes the choice
    weights[t]  = p[t, experts[t]] / sum_j p[t, experts[t, j]]   (renormalize=True)
                = p[t, experts[t]]                               (renormalize=False)

The weights are computed stably: renormalised softmax weights are the softmax of the chosen
logits, renormalised sigmoid weights the softmax of their log-sigmoids (so a row of very negative
logits still gets weights summing to 1). A token is refused (ValueError) when a logit is NaN,
when its scores are undefined (softmax with a +inf logit) or when it has no usable score: its
best logit is -inf, so every p is exactly 0 (and renormalisation is 0/0).

The dispatch layout lists the assignments expert by expert without moving any token:
``sorted_assignments`` [T*k] holds the ids a ordered by expert (increasing a inside an expert) and
expert e's assignments are ``sorted_assignments[expert_offsets[e]:expert_offsets[e + 1]]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _routing_torch
from ._backend import resolve_backend
from ._device_checks import mark_consistent, refuse_unless
from .validation import (check_bool, check_float, check_has_values, check_ndim, check_positive_int,
                         check_same_device, check_shape, check_tensor)

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, with what weight, and the assignments sorted by expert.

    weights [T, k] float32 (differentiable w.r.t. the router logits), experts [T, k] int64,
    num_experts, sorted_assignments [T*k] int64, expert_offsets [E+1] int64 (k = ``top_k``). Nested
    routing also fills group_weights [T, top_k_groups] and groups [T, top_k_groups] int64.
    Every field is a device tensor of a size known from T, k and E, on both backends (no host copy
    of the offsets), so a routing is built and used under torch.compile without a data-dependent
    shape. ``moe_mlp`` checks that a routing is consistent before any kernel reads it (see
    ``_device_checks``), except, in eager mode, one that a routing function returned and whose
    tensors were not written in place since (``_device_checks.mark_consistent``).
    """

    weights: torch.Tensor
    experts: torch.Tensor
    num_experts: int
    sorted_assignments: torch.Tensor
    expert_offsets: torch.Tensor
    group_weights: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        """Assignments per token (nested routing: top_k_groups * top_k_experts)."""
        return self.experts.shape[1]

    @property
    def top_k_groups(self) -> int | None:
        """Groups per token of a nested routing; None for a flat one."""
        return None if self.groups is None else self.groups.shape[1]

    def expert_counts(self) -> torch.Tensor:
        """Assignments per expert [E] int64."""
        return self.expert_offsets.diff()


def dispatch(experts: torch.Tensor, num_experts: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_assignments, expert_offsets) of ``experts`` [T, k] on an already resolved backend."""
    if backend == "triton":
        from . import _routing_triton

        return _routing_triton.dispatch(experts, num_experts)
    return _routing_torch.dispatch(experts, num_experts)


def _refusal(what: str) -> str:
    return what if what.startswith("experts") else (f"{what} contain NaN (or a row whose scores are undefined, "
                                                    "e.g. all -inf)")


def finish_routing(weights: torch.Tensor, experts: torch.Tensor, bad_rows: torch.Tensor, num_experts: int,
                   backend: str, what: str, **fields: torch.Tensor) -> Routing:
    """Build the dispatch layout and refuse NaN scores (``_device_checks.refuse_unless``), the
    check queued before the dispatch so that it never sees a refused routing: ValueError giving
    the count of refused tokens where the check is read back (eager mode on the CPU, the torch
    backend in eager mode), else a device-side assert with no host read (the Triton path on a GPU,
    torch.compile)."""
    refusal = _refusal(what)
    refuse_unless(bad_rows == 0, f"{refusal}: refusing to route them", backend,
                  lambda: f"{refusal} in {int(bad_rows)} token(s): refusing to route them")
    sorted_assignments, offsets = dispatch(experts, num_experts, backend)
    routing = Routing(weights, experts, num_experts, sorted_assignments, offsets, **fields)
    mark_consistent(routing)  # moe_mlp need not check this layout again
    return routing


def topk_route(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
               backend: str | None = None) -> Routing:
    """Route each token to its top_k highest-scoring experts; see the module docstring for the math.

    logits: [T, E], any float dtype (read in float32, under autocast too). Gradients flow from
    ``Routing.weights`` to ``logits``. Refuses NaN scores: ValueError in eager mode (on a GPU: on
    the torch backend), else a device-side assert (see ``finish_routing``). The plain
    reference is ``naive.topk_route``.
    """
    check_float("logits", logits)
    check_has_values("logits", logits)
    check_ndim("logits", logits, 2, "[T, E]")
    check_positive_int("top_k", top_k)
    check_bool("renormalize", renormalize)
    T, E = logits.shape
    k = top_k
    if k > E:
        raise ValueError(f"top_k must be <= the number of experts E = {E}, got top_k = {k}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    backend = resolve_backend(backend, logits.device)
    if T == 0:
        return _empty_routing(logits, k, E)
    if backend == "triton":
        from ._routing_triton import topk_scores

        weights, experts, bad_rows = topk_scores(logits, k, scoring == "sigmoid", renormalize)
    else:
        weights, experts, bad = _routing_torch.route(logits, k, scoring, renormalize)
        bad_rows = bad.sum()
    return finish_routing(weights, experts, bad_rows, E, backend, "router logits")


def routing_from_topk(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, *,
                      backend: str | None = None, repeats: bool = False) -> Routing:
    """A Routing from choices made elsewhere (a model's own router: group-limited, biased, ...).

    experts: [T, k] integer expert ids in [0, num_experts), distinct in each row; weights: [T, k]
    float, the weight of each choice as the caller computed it (kept as float32, differentiable:
    gradients flow back to ``weights``). The dispatch layout is built as for ``topk_route``; a row
    with an id out of range or twice is refused like NaN scores.

    ``repeats=True`` lets a row name an expert more than once (each slot is its own assignment,
    and ``moe_mlp`` sums them): the torch backend only, since the Triton dispatch ranks an expert
    at most once per token. Only ids out of range are refused then, a check read off the
    dispatch itself (no id below 0 sorts before expert 0's segment, none >= E after the last).
    """
    check_topk(experts, weights)
    check_positive_int("num_experts", num_experts)
    check_bool("repeats", repeats)
    backend = resolve_backend(backend, experts.device)
    if repeats and backend != "torch":
        raise ValueError("routing_from_topk(repeats=True) needs the torch backend: the Triton dispatch ranks an "
                         "expert at most once per token")
    T, k = experts.shape
    if T == 0:
        return _empty_routing(weights, k, num_experts)
    experts = experts.long()
    if repeats:
        sorted_assignments, offsets = dispatch(experts, num_experts, backend)
        # offsets[0] counts the ids < 0 and offsets[E] those < E: all are in range exactly when
        # offsets[E] - offsets[0] = T*k.
        refuse_unless(offsets[-1] - offsets[0] == T * k, f"experts hold ids outside [0, {num_experts})", backend)
        routing = Routing(weights.float(), experts, num_experts, sorted_assignments, offsets)
        mark_consistent(routing)
        return routing
    # A row is refused for an id outside the range or an id it holds twice (the dispatch ranks
    # each expert at most once per token).
    in_order = experts.sort(dim=-1).values
    out_of_range = ((experts < 0) | (experts >= num_experts)).any(dim=-1)
    bad_rows = (out_of_range | (in_order[:, 1:] == in_order[:, :-1]).any(dim=-1)).sum()
    # Ids outside the range are clamped so that the torch backend's dispatch stays in bounds until
    # its check raises on them.
    experts = experts.clamp(0, num_experts - 1)
    return finish_routing(weights.float(), experts, bad_rows, num_experts, backend,
                          f"experts hold ids outside [0, {num_experts}) or an id twice in a row")


def check_topk(experts: torch.Tensor, weights: torch.Tensor) -> None:
    """Check a top-k choice made elsewhere: experts [T, k] integer ids, weights [T, k] float, on one device."""
    check_tensor("experts", experts)
    check_has_values("experts", experts)
    if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
        raise TypeError(f"experts must be an integer tensor, got dtype {experts.dtype}")
    check_ndim("experts", experts, 2, "[T, k]")
    check_float("weights", weights)
    check_shape("weights", weights, tuple(experts.shape), "[T, k] (the shape of experts)")
    check_same_device(experts=experts, weights=weights)


def _empty_routing(logits: torch.Tensor, k: int, num_experts: int) -> Routing:
    device = logits.device
    weights = logits[:, :k].float()  # empty, but attached to the graph of logits
    return Routing(weights, torch.zeros(0, k, dtype=torch.int64, device=device), num_experts,
                   torch.zeros(0, dtype=torch.int64, device=device),
                   torch.zeros(num_experts + 1, dtype=torch.int64, device=device))
