"""The "torch" backend of the sigmoid-gated selective scan: vectorised chunked PyTorch.

Within a chunk of T tokens starting from state h_in, with the cumulative log decay
Lambda_t = sum_{s<=t} log a_s ([D] per token) and x_s = (1 - a_s) u_s Bm_s^T,

    h_t = exp(Lambda_t) h_in + sum_{s<=t} exp(Lambda_t - Lambda_s) x_s
    y_t = exp(Lambda_t) (h_in Cm_t) + sum_{s<=t} exp(Lambda_t - Lambda_s) (1 - a_s) u_s (Cm_t . Bm_s)

computed for all t at once ([B, T, T, D] decay weights, only their s <= t half exponentiated, so
nothing overflows); a Python loop runs over chunks only. State and arithmetic in float32
(float64 for float64 inputs); autograd through PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 32


def gated_scan_torch(u: torch.Tensor, f: torch.Tensor, bm: torch.Tensor, cm: torch.Tensor,
                     d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
                     h0: torch.Tensor | None = None, reverse: bool = False, chunk: int = CHUNK):
    """Sequences [B, L, *]: returns (out [B, L, D] in u.dtype, final state [B, D, N])."""
    if reverse:
        flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
        out, h_final = gated_scan_torch(flip(u), flip(f), flip(bm), flip(cm), d_skip, flip(z), h0,
                                        reverse=False, chunk=chunk)
        return out.flip(1), h_final

    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_, f_, bm_, cm_ = (t.to(compute) for t in (u, f, bm, cm))
    batch, length, dim = u.shape
    log_a = F.logsigmoid(f_)
    write = torch.exp(F.logsigmoid(-f_)) * u_  # (1 - a) u
    h = (torch.zeros(batch, dim, bm.shape[-1], device=u.device, dtype=compute) if h0 is None
         else h0.to(compute))

    outputs = []
    for start in range(0, length, chunk):
        part = slice(start, min(start + chunk, length))
        cum = log_a[:, part].cumsum(1)                               # [B, T, D]
        steps = cum.shape[1]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril()
        gap = (cum[:, :, None, :] - cum[:, None, :, :])              # [B, T(t), T(s), D]
        weight = torch.exp(gap.masked_fill(~causal[None, :, :, None], -torch.inf))
        scores = torch.einsum("btn,bsn->bts", cm_[:, part], bm_[:, part])
        y = torch.einsum("btsd,bts,bsd->btd", weight, scores, write[:, part])
        y = y + torch.exp(cum) * torch.einsum("bdn,btn->btd", h, cm_[:, part])
        last = cum[:, -1]                                            # [B, D]
        h = torch.exp(last)[:, :, None] * h + torch.einsum(
            "bsd,bsn->bdn", torch.exp(last[:, None, :] - cum) * write[:, part], bm_[:, part])
        outputs.append(y)

    y = torch.cat(outputs, dim=1)
    if d_skip is not None:
        y = y + d_skip.to(compute) * u_
    if z is not None:
        y = y * torch.sigmoid(z.to(compute))
    return y.to(u.dtype), h
