"""The "torch" backend of the sigmoid-gated selective scan: chunked PyTorch without a Python loop.

The sequence is cut into chunks of T tokens (the tail padded with a = 1, u = 0, which neither
decays nor writes the state). Within a chunk c starting from state H_c, with the cumulative log
decay Lambda_t = sum_{s<=t} log a_s ([D] per token) and x_s = (1 - a_s) u_s Bm_s^T,

    h_t = exp(Lambda_t) H_c + sum_{s<=t} exp(Lambda_t - Lambda_s) x_s
    y_t = exp(Lambda_t) (H_c Cm_t) + sum_{s<=t} exp(Lambda_t - Lambda_s) (1 - a_s) u_s (Cm_t . Bm_s)

The second sums are computed for every chunk at once ([B, C, T, T, D] decay weights). The chunk
start states follow the same recurrence one level up: with S_c = sum_s exp(Lambda_T - Lambda_s) x_s
the state chunk c writes from zero, and P_c = sum_{c'<=c} Lambda_T(c') the cumulative chunk decay,

    H_c = exp(P_{c-1}) h_0 + sum_{c'<c} exp(P_{c-1} - P_{c'}) S_{c'}

again all at once ([B, C, C, D] weights). Only the s <= t (c' < c) halves are exponentiated, so
nothing overflows; the cumulative log decays are float64 sums, so their differences are as
precise as a product of per-token gates (extreme decay logits, |f| ~ 30-80, keep full precision).
State and arithmetic in float32 (float64 for float64 inputs); autograd through PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 8
SEGMENT_CHUNKS = 64
_LOG_ZERO = -2000.0  # exp(-2000) == 0 in float64 and float32


def _exp(log_decay: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp of a (float64) log decay, in the compute dtype."""
    return torch.exp(log_decay.to(dtype))


def _decay(to: torch.Tensor, since: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cumulative log decays [..., T] and [..., S] (float64) -> weights exp(to_t - since_s)
    [..., T, S] in ``dtype`` where ``keep`` [T, S] holds, 0 elsewhere (the masked half is never
    exponentiated: no overflow). The gaps are differences of float64 sums, so they keep the
    precision of a per-token product however large the sums grow."""
    gap = (to[..., :, None] - since[..., None, :]).to(dtype)
    return torch.exp(gap.masked_fill(~keep, -torch.inf))


def _non_finite(u, f, bm, cm, h0):
    """Where non-finite inputs reach, in the recurrence's causal order: (outputs [B, L, D], final
    state [B, D, N]). A non-finite u or NaN f at (t, d) reaches state row d, a non-finite Bm at
    (t, n) state column n, from token t on (the state stays non-finite: a * inf and 0 * inf are
    never finite again), and an output through any entry of its row; a non-finite h0 entry
    reaches itself from the start; a non-finite Cm the output of its own token only. f = +-inf
    is a valid gate (a = 1, 0)."""
    rows = ~torch.isfinite(u) | f.isnan()                                  # [B, L, D]
    columns = ~torch.isfinite(bm)                                          # [B, L, N]
    outputs = rows | columns.any(-1, keepdim=True)
    start = None if h0 is None else ~torch.isfinite(h0)                    # [B, D, N]
    if start is not None:
        outputs[:, 0] |= start.any(-1)
    outputs = (outputs.cumsum(1, dtype=torch.int32) > 0) | ~torch.isfinite(cm).all(-1, keepdim=True)
    final = rows.any(1)[:, :, None] | columns.any(1)[:, None, :]
    return outputs, final if start is None else final | start


def gated_scan_torch(u: torch.Tensor, f: torch.Tensor, bm: torch.Tensor, cm: torch.Tensor,
                     d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
                     h0: torch.Tensor | None = None, reverse: bool = False, chunk: int = CHUNK,
                     segment_chunks: int = SEGMENT_CHUNKS):
    """Sequences [B, L, *]: returns (out [B, L, D] in u.dtype, final state [B, D, N])."""
    if reverse:
        flip = lambda t: None if t is None else t.flip(1)
        out, h_final = gated_scan_torch(flip(u), flip(f), flip(bm), flip(cm), d_skip, flip(z), h0,
                                        reverse=False, chunk=chunk, segment_chunks=segment_chunks)
        return out.flip(1), h_final

    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_, f_, bm_, cm_ = (t.to(compute) for t in (u, f, bm, cm))
    h = None if h0 is None else h0.to(compute)
    # The closed form mixes every token of a chunk into matrix products (0 * NaN = NaN), so
    # non-finite inputs are zeroed for it and the outputs they reach are set to NaN afterwards:
    # a NaN at token t changes nothing before t.
    reached, reached_final = _non_finite(u_, f_, bm_, cm_, h)
    clean = lambda t: t.masked_fill(~torch.isfinite(t), 0.0)  # noqa: E731
    u_clean, bm_clean, cm_clean = clean(u_), clean(bm_), clean(cm_)
    f_clean = f_.masked_fill(f_.isnan(), 0.0)
    h = None if h is None else clean(h)
    # Segments of segment_chunks chunks bound the [C, C] chunk-state weights (memory and work
    # quadratic in C) to a constant; a Python loop runs over segments only.
    outputs, span = [], chunk * segment_chunks
    for start in range(0, u.shape[1], span):
        part = slice(start, start + span)
        y, h = _chunked_scan(u_clean[:, part], f_clean[:, part], bm_clean[:, part], cm_clean[:, part], h, chunk)
        outputs.append(y)
    y = torch.cat(outputs, dim=1).masked_fill(reached, torch.nan)
    h = h.masked_fill(reached_final, torch.nan)
    if d_skip is not None:
        y = y + d_skip.to(compute) * u_
    if z is not None:
        y = y * torch.sigmoid(z.to(compute))
    return y.to(u.dtype), h


def _chunked_scan(u: torch.Tensor, f: torch.Tensor, bm: torch.Tensor, cm: torch.Tensor,
                  h0: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment, no Python loop: (y [B, L, D] without skip and gate, final state [B, D, N])."""
    batch, length, dim = u.shape
    steps = min(chunk, length)
    chunks = -(-length // steps)
    pad = chunks * steps - length

    def in_chunks(t: torch.Tensor) -> torch.Tensor:  # [B, L, X] -> [B, C, T, X], zero-padded tail
        return F.pad(t, (0, 0, 0, pad)).view(batch, chunks, steps, t.shape[-1])

    # log a, float64 for the cumulative sums; a decay exactly 0 (f = -inf) is clamped to a log
    # whose exp is 0 in float64, so that differences of sums across it stay finite.
    log_a = in_chunks(F.logsigmoid(f).to(torch.float64).clamp_min(_LOG_ZERO))  # 0 on the padding
    write = in_chunks(torch.exp(F.logsigmoid(-f)) * u)         # (1 - a) u
    bm_c, cm_c = in_chunks(bm), in_chunks(cm)
    dtype = u.dtype

    # Decay weights are laid out [..., D, T, S] so that the sums over s are batched matrix products.
    cum = log_a.cumsum(2)                                        # Lambda [B, C, T, D]
    causal = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril()
    cum_by_channel = cum.transpose(2, 3)                         # [B, C, D, T]
    weight = _decay(cum_by_channel, cum_by_channel, causal, dtype)  # [B, C, D, T, S]
    scores = cm_c @ bm_c.transpose(2, 3)                         # Cm_t . Bm_s [B, C, T, S]
    y = ((weight * scores[:, :, None]) @ write.transpose(2, 3)[..., None]).squeeze(-1).transpose(2, 3)

    last = cum[:, :, -1]                                         # Lambda_T per chunk [B, C, D]
    written = (_exp(last[:, :, None] - cum, dtype) * write).transpose(2, 3) @ bm_c  # S_c [B, C, D, N]
    total = last.cumsum(1)                                       # P_c [B, C, D]
    before = total - last                                        # P_{c-1}
    earlier = torch.ones(chunks, chunks, dtype=torch.bool, device=u.device).tril(-1)
    carry = _decay(before.transpose(1, 2), total.transpose(1, 2), earlier, dtype)  # [B, D, C, C]
    starts = (carry @ written.transpose(1, 2)).transpose(1, 2)  # H_c [B, C, D, N]
    if h0 is not None:
        starts = starts + _exp(before, dtype)[..., None] * h0[:, None]
    y = y + _exp(cum, dtype) * (cm_c @ starts.transpose(2, 3))   # exp(Lambda_t) (H_c Cm_t)
    h_final = _exp(last[:, -1], dtype)[..., None] * starts[:, -1] + written[:, -1]  # the last chunk's end

    return y.reshape(batch, chunks * steps, dim)[:, :length], h_final
