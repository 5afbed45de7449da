"""One plain PyTorch reference per op: the math of each op written the readable way (loops over
tokens or experts, no fusion, no chunking), for reading, debugging and as the benchmarks' naive
baselines. Slow on purpose; not a backend.

    stable_top_k   the k largest entries of each row, ties to the lower index
    topk_route     router scores and top-k choice                  (``topk_route``'s math)
    nested_route   groups, then sub-experts inside each group      (``nested_route``'s math)
    activate       act(z) of any activation spec, from its definition
    expert_mlp     act(u @ w1 + b1) @ w2 + b2 for one expert
    moe_mlp        a loop over experts: gather, expert MLP, weighted add (``moe_mlp``'s math)
    gated_scan     the scan one token at a time                    (``gated_scan``'s math)
    gated_scan_2d  the same over a grid's cells in visit order     (``gated_scan_2d``'s math)

Routing here returns plain (weights, experts) tensors, not a ``Routing``: the dispatch layout is
an implementation device, not part of the math. Scores and scan states are float32 (float64 for
float64 inputs). The tests check these against their own float64 oracles.
"""
from __future__ import annotations

import torch

import math

from .activations import Activation, activation_spec


def stable_top_k(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of ``p``, ties to the lower index.

    A stable descending sort keeps equal values in index order, which ``torch.topk`` does not
    promise (ties are common: bf16 logits, saturated sigmoids).
    """
    order = p.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return p.gather(-1, order), order


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(compute)
    return logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()


def _renormalized(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(dim=-1, keepdim=True)


def topk_route(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
               renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k]) for logits [T, E]: the k highest logits chosen (the scores
    are monotone in them, and logits cannot underflow), their scores softmax (or sigmoid) of the
    logits, renormalised to sum to 1 per token if asked."""
    scores = _scores(logits, scoring)
    experts = stable_top_k(logits.to(scores.dtype), top_k)[1]
    weights = scores.gather(-1, experts)
    return (_renormalized(weights) if renormalize else weights), experts


def nested_route(group_logits: torch.Tensor, expert_logits: torch.Tensor, top_k_groups: int,
                 top_k_experts: int, *, renormalize: bool = True) -> tuple[torch.Tensor, ...]:
    """(weights [T, kg*ke], experts [T, kg*ke], group_weights [T, kg], groups [T, kg]) for
    group_logits [T, G] and expert_logits [T, G, E], one token at a time: the groups' top-k, then
    inside each chosen group the sub-experts' top-k; weight q_g * s_e|g on expert g*E + e, columns
    group rank major."""
    T, G, E = expert_logits.shape
    rows = []
    for t in range(T):
        q, groups = topk_route(group_logits[t:t + 1], top_k_groups, renormalize=renormalize)
        weights, experts = [], []
        for i, g in enumerate(groups[0].tolist()):
            s, subs = topk_route(expert_logits[t:t + 1, g], top_k_experts, renormalize=renormalize)
            weights.append(q[0, i] * s[0])
            experts.append(g * E + subs[0])
        rows.append((torch.cat(weights), torch.cat(experts), q[0], groups[0]))
    if T == 0:
        k, dtype = top_k_groups * top_k_experts, _scores(group_logits, "softmax").dtype
        empty = lambda n, d: torch.zeros(0, n, dtype=d, device=group_logits.device)  # noqa: E731
        return empty(k, dtype), empty(k, torch.int64), empty(top_k_groups, dtype), empty(top_k_groups, torch.int64)
    return tuple(torch.stack(column) for column in zip(*rows))


def _plain_activation(z: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    if kind == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if kind == "silu":
        return z * torch.sigmoid(alpha * z)
    relu = z.clamp(min=0)
    return relu if kind == "relu" else relu * relu


def activate(z: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act(z) of a name or ``ActivationSpec``, written from the definitions (``activations``
    module docstring): for a gated spec, gate and up are z's halves (or its even and odd columns),
    h = c_a(f(c_g(gate))) * (s_u(clamp(up, -limit, limit)) + up_offset), s_u(u) = S_u tanh(u / S_u)
    with an up softcap, and f(g) = S_g tanh(g / S_g) sigmoid(alpha g) with a gate softcap."""
    spec = activation_spec(activation)
    if not spec.gated:
        return _plain_activation(z, spec.kind, 1.0)
    H = z.shape[-1] // 2
    gate, up = (z[..., 0::2], z[..., 1::2]) if spec.interleaved else (z[..., :H], z[..., H:])
    gate_fn = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}[spec.kind]
    if spec.limit is not None and not spec.clamp_after:
        gate = torch.clamp(gate, max=spec.limit)
    if spec.gate_softcap is not None:
        f = spec.gate_softcap * torch.tanh(gate / spec.gate_softcap) * torch.sigmoid(spec.alpha * gate)
    else:
        f = _plain_activation(gate, gate_fn, spec.alpha)
    if spec.limit is not None:
        if spec.clamp_after:
            f = torch.clamp(f, max=spec.limit)
        up = torch.clamp(up, min=-spec.limit, max=spec.limit)
    if spec.up_softcap is not None:
        up = spec.up_softcap * torch.tanh(up / spec.up_softcap)
    return f * (up + spec.up_offset)


def expert_mlp(u: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, activation: Activation) -> torch.Tensor:
    """act(u @ w1 + b1) @ w2 + b2 for one expert's rows u [n, D]; for a gated activation the first
    layer's output holds gate and up."""
    z = u @ w1 if b1 is None else torch.addmm(b1, u, w1)
    h = activate(z, activation)
    return h @ w2 if b2 is None else torch.addmm(b2, h, w2)


def moe_mlp(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor,
            w2: torch.Tensor, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None, *,
            activation: Activation = "gelu") -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * Expert_{experts[t, j]}(x[t]) for x [T, D]: expert by expert,
    gather the expert's tokens, run its MLP, add the weighted rows back (in float32, float64 for
    float64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros(x.shape[0], w2.shape[-1], dtype=acc, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.where(experts == e)
        if tokens.numel():
            out = expert_mlp(x[tokens], w1[e], None if b1 is None else b1[e], w2[e],
                             None if b2 is None else b2[e], activation)
            y.index_add_(0, tokens, out.to(acc) * weights[tokens, slots, None].to(acc))
    return y.to(x.dtype)


def gated_scan(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
               d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
               h0: torch.Tensor | None = None, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, L, D] in u's dtype, final state [B, D, N]) for sequences [B, L, *], one token at a
    time, t = 0 .. L-1 (L-1 .. 0 with ``reverse``):

        a = sigmoid(f_t);  h = a h + (1 - a) u_t Bm_t^T;  y_t = h Cm_t + d_skip u_t;  out_t = y_t sigmoid(z_t)
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, length, dim = u.shape
    h = torch.zeros(batch, dim, Bm.shape[-1], device=u.device, dtype=compute) if h0 is None else h0.to(compute)
    out = torch.zeros(batch, length, dim, device=u.device, dtype=compute)
    for t in (reversed(range(length)) if reverse else range(length)):
        a, u_t = torch.sigmoid(f[:, t].to(compute)), u[:, t].to(compute)
        h = a[:, :, None] * h + ((1 - a) * u_t)[:, :, None] * Bm[:, t, None, :].to(compute)
        y = (h * Cm[:, t, None, :].to(compute)).sum(-1)
        if d_skip is not None:
            y = y + d_skip.to(compute) * u_t
        if z is not None:
            y = y * torch.sigmoid(z[:, t].to(compute))
        out[:, t] = y
    return out.to(u.dtype), h


def gated_scan_2d(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
                  order: str = "row", reverse: bool = False, d_skip: torch.Tensor | None = None,
                  z: torch.Tensor | None = None, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, W, D], final state) for a [B, H, W, *] grid: the cells are visited row by row
    ("row") or column by column ("col"), backwards with ``reverse``, and each result is written
    at its own cell."""
    batch, height, width, dim = u.shape
    cells = [(i, j) for i in range(height) for j in range(width)] if order == "row" else \
            [(i, j) for j in range(width) for i in range(height)]
    rows, cols = (torch.tensor([c[axis] for c in cells], dtype=torch.long, device=u.device) for axis in (0, 1))
    visit = lambda t: None if t is None else t[:, rows, cols]  # noqa: E731 - [B, H, W, X] -> [B, H*W, X]
    seq_out, h = gated_scan(visit(u), visit(f), visit(Bm), visit(Cm), d_skip=d_skip, z=visit(z), h0=h0,
                            reverse=reverse)
    out = torch.zeros_like(u)
    out[:, rows, cols] = seq_out
    return out, h
