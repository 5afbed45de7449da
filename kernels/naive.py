"""The float64 reference of every op: each op's math written the readable way (loops over
tokens, experts or cells, no fusion, no chunking), computed and returned in float64 whatever the
inputs' dtype, with two rewrites that keep float64 exact where the direct formula is not: routing
weights from log-scores, and 1 - sigmoid(f) as sigmoid(-f). It is the one oracle the tests and
benchmarks compare the backends with; slow on purpose, not a backend, and independent of them:
it imports no backend (Triton or torch), and no backend imports it.

    stable_top_k   the k largest entries of each row, ties to the lower index
    topk_route     router scores and top-k choice                  (``topk_route``'s math)
    router_loss_stats  the token sums of a router's balance and z losses (``router_loss_stats``'s math)
    nested_route   groups, then sub-experts inside each group      (``nested_route``'s math)
    dispatch       the dispatch layout of a choice: assignments grouped by expert, and offsets
    activate       act(z) of any activation spec, from its definition
    expert_mlp     act(u @ w1 + b1) @ w2 + b2 for one expert
    moe_mlp        a loop over experts: gather, expert MLP, weighted add (``moe_mlp``'s math)
    gated_scan     the scan one token at a time                    (``gated_scan``'s math)
    gated_scan_2d  the same over a grid's cells in visit order     (``gated_scan_2d``'s math)

Every function is differentiable by autograd where the op is (the weights with respect to the
logits, the MLP and the scan with respect to every float input), so its float64 gradients are
the reference of the backends' backward passes too. Routing here returns plain (weights,
experts) tensors, not a ``Routing``: the dispatch layout is an implementation device, given
separately by ``dispatch``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activations import Activation, activation_spec


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


def stable_top_k(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float64, indices int64) of the k largest entries of each row of ``p`` [.., E], in
    decreasing order, equal values in increasing index order: each row's indices sorted by the key
    (-p[e], e). A plain Python sort per row (no ``torch.sort``/``torch.topk``, which the backends
    use), so it is an independent reference of their choice."""
    p = _f64(p)
    rows = p.reshape(-1, p.shape[-1])
    order = [sorted(range(rows.shape[1]), key=lambda e, row=row: (-row[e], e))[:k] for row in rows.tolist()]
    indices = torch.tensor(order, dtype=torch.int64, device=p.device).reshape(*p.shape[:-1], k)
    return p.gather(-1, indices), indices


def topk_route(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
               renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float64, experts [T, k] int64) for logits [T, E]. The k highest logits are
    chosen (the scores are monotone in them, and logits cannot underflow where scores do), ties to
    the lower index. With p = softmax(logits) (or sigmoid(logits)) and C the chosen experts:

        weights[j] = p[C_j] / sum_{c in C} p[c]     (renormalize)       else   p[C_j]

    computed from log p (log_softmax or logsigmoid) as softmax(log p[C]) or exp(log p[C]), the
    same numbers without the underflow of p itself: sigmoid(-1e3) is 0 in float64, yet the
    renormalised weights of two such logits are well defined. A row whose best logit is -inf (or
    with a NaN, or a +inf softmax logit) has no defined weights and gets NaN."""
    logits = _f64(logits)
    experts = stable_top_k(logits, top_k)[1]
    log_p = logits.log_softmax(-1) if scoring == "softmax" else F.logsigmoid(logits)
    chosen = log_p.gather(-1, experts)
    return (chosen.softmax(-1) if renormalize else chosen.exp()), experts


def router_loss_stats(logits: torch.Tensor, scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t P_t [E], sum_t logsumexp(l_t)^2) in float64, token by token: P_t = softmax(l_t), or
    sigmoid(l_t) / sum_e sigmoid(l_te) (no clamp: float64 does not reach float32's tiny at the
    logits the tests use)."""
    logits = _f64(logits)
    prob_sums = logits.new_zeros(logits.shape[1])
    lse_sq_sum = logits.new_zeros(())
    for row in logits:
        lse = row.max() + (row - row.max()).exp().sum().log()
        scores = (row - lse).exp() if scoring == "softmax" else torch.sigmoid(row)
        prob_sums = prob_sums + scores / scores.sum()
        lse_sq_sum = lse_sq_sum + lse * lse
    return prob_sums, lse_sq_sum


def nested_route(group_logits: torch.Tensor, expert_logits: torch.Tensor, top_k_groups: int,
                 top_k_experts: int, *, renormalize: bool = True) -> tuple[torch.Tensor, ...]:
    """(weights [T, kg*ke], experts [T, kg*ke], group_weights [T, kg], groups [T, kg]) for
    group_logits [T, G] and expert_logits [T, G, E] (or [T, G*E]), one token at a time: the
    groups' softmax top-k (weights q_g), then inside each chosen group g the sub-experts' softmax
    top-k (weights s_e|g); weight q_g * s_e|g on expert g*E + e, columns group rank major. An
    unchosen group's sub-expert logits are never read."""
    T, G = group_logits.shape
    E = expert_logits.shape[-1] if expert_logits.dim() == 3 else expert_logits.shape[-1] // G
    expert_logits = expert_logits.reshape(T, G, E)
    k = top_k_groups * top_k_experts
    if T == 0:
        empty = lambda n, dtype: torch.zeros(0, n, dtype=dtype, device=group_logits.device)  # noqa: E731
        return (empty(k, torch.float64), empty(k, torch.int64), empty(top_k_groups, torch.float64),
                empty(top_k_groups, torch.int64))
    rows = []
    for t in range(T):
        q, groups = topk_route(group_logits[t:t + 1], top_k_groups, renormalize=renormalize)
        weights, experts = [], []
        for i, g in enumerate(groups[0].tolist()):
            s, subs = topk_route(expert_logits[t:t + 1, g], top_k_experts, renormalize=renormalize)
            weights.append(q[0, i] * s[0])
            experts.append(g * E + subs[0])
        rows.append((torch.cat(weights), torch.cat(experts), q[0], groups[0]))
    return tuple(torch.stack(column) for column in zip(*rows))


def dispatch(experts: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
    """(sorted_assignments, expert_offsets) of a choice experts [T, k], as lists: the assignments
    a = t*k + j listed expert by expert, in increasing a inside an expert, and offsets[e] = the
    number of assignments to experts below e (offsets[E] = T*k), so expert e's assignments are
    sorted_assignments[offsets[e]:offsets[e+1]]. An expert may appear twice in a row."""
    flat = experts.reshape(-1).tolist()
    order = [a for e in range(num_experts) for a, chosen in enumerate(flat) if chosen == e]
    offsets = [sum(1 for chosen in flat if chosen < e) for e in range(num_experts + 1)]
    return order, offsets


def _plain_activation(z: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    if kind == "gelu":
        return 0.5 * z * torch.special.erfc(-z / math.sqrt(2))  # erfc: no cancellation for z < 0
    if kind == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if kind == "silu":
        return z * torch.sigmoid(alpha * z)
    relu = z.clamp(min=0)
    return relu if kind == "relu" else relu * relu


def activate(z: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act(z) in float64 of a name or ``ActivationSpec``, written from the definitions (``activations``
    module docstring): for a gated spec, gate and up are z's halves (or its even and odd columns),
    h = c_a(f(c_g(gate))) * (s_u(clamp(up, -limit, limit)) + up_offset), s_u(u) = S_u tanh(u / S_u)
    with an up softcap, and f(g) = S_g tanh(g / S_g) sigmoid(alpha g) with a gate softcap."""
    spec = activation_spec(activation)
    z = _f64(z)
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
    """act(u @ w1 + b1) @ w2 + b2 for one expert's rows u [n, D], in float64; for a gated
    activation the first layer's output holds gate and up."""
    u, w1, b1, w2, b2 = (_f64(t) for t in (u, w1, b1, w2, b2))
    z = u @ w1 if b1 is None else u @ w1 + b1
    h = activate(z, activation)
    return h @ w2 if b2 is None else h @ w2 + b2


def moe_mlp(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor,
            w2: torch.Tensor, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None, *,
            activation: Activation = "gelu") -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * Expert_{experts[t, j]}(x[t]) for x [T, D], in float64: expert
    by expert, gather the expert's tokens, run its MLP, add the weighted rows back."""
    x, weights = _f64(x), _f64(weights)
    y = torch.zeros(x.shape[0], w2.shape[-1], dtype=torch.float64, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.where(experts == e)
        if tokens.numel():
            out = expert_mlp(x[tokens], w1[e], None if b1 is None else b1[e], w2[e],
                             None if b2 is None else b2[e], activation)
            y = y.index_add(0, tokens, out * weights[tokens, slots, None])
    return y


def gated_scan(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
               d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
               h0: torch.Tensor | None = None, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, L, D], final state [B, D, N]), both float64, for sequences u, f, z [B, L, D] and
    Bm, Cm [B, L, N], one token at a time, t = 0 .. L-1 (L-1 .. 0 with ``reverse``), from h0 (or 0):

        a = sigmoid(f_t);  h = a h + (1 - a) u_t Bm_t^T;  y_t = h Cm_t + d_skip u_t;  out_t = y_t sigmoid(z_t)

    1 - a is computed as sigmoid(-f_t), which is the same number without the cancellation of
    1 - sigmoid(f_t) at large f_t (f = 40: 1 - a = 4e-18, which 1 - a in float64 rounds to 0)."""
    u, f, Bm, Cm, d_skip, z, h0 = (_f64(t) for t in (u, f, Bm, Cm, d_skip, z, h0))
    batch, length, dim = u.shape
    h = torch.zeros(batch, dim, Bm.shape[-1], device=u.device, dtype=torch.float64) if h0 is None else h0
    outs = [None] * length
    for t in (reversed(range(length)) if reverse else range(length)):
        a, one_minus_a = torch.sigmoid(f[:, t]), torch.sigmoid(-f[:, t])
        h = a[:, :, None] * h + (one_minus_a * u[:, t])[:, :, None] * Bm[:, t, None, :]
        y = (h * Cm[:, t, None, :]).sum(-1)
        if d_skip is not None:
            y = y + d_skip * u[:, t]
        if z is not None:
            y = y * torch.sigmoid(z[:, t])
        outs[t] = y
    out = torch.stack(outs, dim=1) if length else torch.zeros(batch, 0, dim, dtype=torch.float64, device=u.device)
    return out, h


def visit_order(height: int, width: int, order: str) -> list[tuple[int, int]]:
    """The (row, column) cells of a height x width grid in the order ``gated_scan_2d`` visits
    them: row by row ("row") or column by column ("col"); ``reverse`` walks this list backwards."""
    if order == "row":
        return [(i, j) for i in range(height) for j in range(width)]
    return [(i, j) for j in range(width) for i in range(height)]


def gated_scan_2d(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
                  order: str = "row", reverse: bool = False, d_skip: torch.Tensor | None = None,
                  z: torch.Tensor | None = None, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, W, D] float64, final state) for a [B, H, W, *] grid: the 1-D scan over the cells
    in ``visit_order`` (backwards with ``reverse``), each result written at its own cell."""
    batch, height, width, dim = u.shape
    cells = visit_order(height, width, order)
    rows, cols = (torch.tensor([c[axis] for c in cells], dtype=torch.long, device=u.device) for axis in (0, 1))
    visit = lambda t: None if t is None else t[:, rows, cols]  # noqa: E731 - [B, H, W, X] -> [B, H*W, X]
    seq_out, h = gated_scan(visit(u), visit(f), visit(Bm), visit(Cm), d_skip=d_skip, z=visit(z), h0=h0,
                            reverse=reverse)
    out = torch.zeros(batch, height, width, dim, dtype=torch.float64, device=u.device)
    out[:, rows, cols] = seq_out
    return out, h
