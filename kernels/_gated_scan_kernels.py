"""Triton kernels of the sigmoid-gated selective scan (the launches and custom ops are in ``_gated_scan_triton``).

Per batch row, with a_t = sigmoid(f_t) and x_t = (1 - a_t) u_t Bm_t^T (a [D, N] outer product):

    h_t   = a_t * h_{t-1} + x_t                     h_{-1} = h0 (or 0); state in float32
    y_t   = h_t Cm_t + d_skip * u_t
    out_t = y_t * sigmoid(z_t)                      (y_t when z is absent)

Gates are computed in the kernels from the logits, in log space:
log a = -softplus(-f), log(1 - a) = -softplus(f), so neither a -> 1 nor a -> 0 loses precision.

Tokens are visited in "sequence order" k = 0..L-1 over a [B, H, W, C] grid: row-major
(k -> (k // W, k % W)) or column-major (k -> (k % H, k // H)), optionally reversed
(k -> L-1-k). Every kernel turns k into a memory offset through the strides, so 1-D
sequences ([B, 1, L, C]) and all four 2-D orders run on the same kernels with no permuted copy.

Forward: the sequence is cut into chunks of CHUNK tokens.
  1. ``_chunk_state_kernel``: per (chunk, channel block, batch), the chunk's state from zero,
     S_c = sum_{t in c} (prod_{s in c, s > t} a_s) x_t, and its log decay G_c = sum_{t in c} log a_t.
  2. ``_chunk_carry_kernel``: the state at the end of every chunk, H_c = exp(G_c) H_{c-1} + S_c,
     an associative scan of the affine maps h -> exp(G_c) h + S_c over blocks of chunks.
  3. ``_chunk_output_kernel``: per chunk, the recurrence again from H_{c-1}, with the output,
     d_skip and the z gate fused into the store.

Backward (adjoint lambda_t = dL/dh_t, lambda_t = a_{t+1} lambda_{t+1} + dy_t Cm_t):
  4. ``_chunk_adjoint_kernel``: per chunk, mu = a_s lambda_s at the chunk's first token s,
     from zero at its end (the adjoint twin of step 1).
  5. ``_chunk_carry_kernel`` over the chunks in reverse: M_c = exp(G_c) M_{c+1} + R_c, the
     adjoint flowing out of chunk c into the state before it (M_{NC} = dL/dh_final; M_0 = dh0).
  6. ``_chunk_backward_kernel``: per chunk, a forward sweep from H_{c-1} (dz, dCm, d_skip terms
     and prefix sums of Q_t = dy_t (h_t Cm_t)), then a reverse sweep from M_{c+1} (du, dBm, df).

The decay gradient needs lambda_t . h_{t-1}, a product of a forward and a reverse quantity.
Counting pairs (r, s), r < t <= s, of "written at r, read at s" gives, with the chunk's
boundary state H_{c-1} as a virtual write before it and M_{c+1} as a virtual read after it,

    dL/dlog a_t = sum_{s=t}^{e-1} Q_s + M_{c+1} . h_{e-1} - sum_{r=t}^{e-1} K_r,
    K_r = (1 - a_r) u_r (lambda_r Bm_r),

so the forward sweep hands only a per-token prefix of Q to the reverse sweep (through a float32
[B, L, D] buffer, df's own when f is float32), and no [B, L, D, N] state is stored: the forward saves the chunk states H only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tuning import kernel_configs


@triton.jit
def _chunk_program(L, D, N, sx_b, sn_b, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a (chunk, channel block, batch) program works on: chunk c, channel block pid_d,
    batch row b, tokens [start, end), channel and state lanes with masks, and the batch row's
    int64 base offsets into the [.., D] and [.., N] tensors."""
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    start = c * CHUNK
    return (c, pid_d, b, start, tl.minimum(start + CHUNK, L), offs_d, offs_n, offs_d < D, offs_n < N,
            b.to(tl.int64) * sx_b, b.to(tl.int64) * sn_b)


@triton.jit
def _load_token(k, U, F, BM, CM, L, INNER, base_x, base_n, sx_o, sx_i, sn_o, sn_i,
                offs_d, offs_n, mask_d, mask_n, REVERSE: tl.constexpr,
                READ_U_BM: tl.constexpr = True, READ_CM: tl.constexpr = True):
    """The k-th visited token of a [H, W] grid read through strides: its int64 offsets into
    the [.., D] and [.., N] tensors, and float32 u, log a, a, 1 - a, Bm, Cm. A kernel that has
    no use for u and Bm (or Cm) leaves them unread (zeros): the compiler would drop the loads,
    but the interpreter, which counts the traffic, runs them."""
    if REVERSE:
        k = L - 1 - k
    k = tl.cast(k, tl.int64)
    row, col = k // INNER, k % INNER
    ox = base_x + row * sx_o + col * sx_i
    on = base_n + row * sn_o + col * sn_i
    f = tl.load(F + ox + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if READ_U_BM:
        u = tl.load(U + ox + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        bm = tl.load(BM + on + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        u = tl.zeros(f.shape, tl.float32)
        bm = tl.zeros(offs_n.shape, tl.float32)
    if READ_CM:
        cm = tl.load(CM + on + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        cm = tl.zeros(offs_n.shape, tl.float32)
    # log a = log sigmoid(f) = min(f, 0) - log(1 + exp(-|f|)); log(1 - a) = log sigmoid(-f), written
    # the same way (not as log a - f, which is inf - inf at f = +-inf: decay exactly 0 or 1)
    soft = tl.log(1.0 + tl.exp(-tl.abs(f)))
    log_a = tl.minimum(f, 0.0) - soft
    return ox, on, u, log_a, tl.exp(log_a), tl.exp(tl.minimum(-f, 0.0) - soft), bm, cm


@triton.jit
def _affine_compose(a1, b1, a2, b2):
    # (h -> a2 h + b2) after (h -> a1 h + b1)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _state_before_chunk(H, H0, b, c, D, N, NC, state, mask, HAS_H0: tl.constexpr):
    """The state entering chunk c: H[b, c-1], or h0 (or zero) for the first chunk."""
    # a scalar condition is applied with tl.where, not in the load mask: the interpreter
    # rejects a block mask combined with a scalar predicate
    prev = tl.load(H + (b.to(tl.int64) * NC + tl.maximum(c - 1, 0)) * D * N + state, mask=mask, other=0.0)
    if HAS_H0:
        first = tl.load(H0 + b.to(tl.int64) * D * N + state, mask=mask, other=0.0)
    else:
        first = tl.zeros(prev.shape, tl.float32)
    return tl.where(c > 0, prev, first)


def _chunk_configs(name: str):
    """Configurations of the (chunk, channel block, batch) kernels: channel block and warps."""
    return kernel_configs(name, {"BLOCK_D": 32, "num_warps": 2},
                          [{"BLOCK_D": 16, "num_warps": 1}, {"BLOCK_D": 32, "num_warps": 4},
                           {"BLOCK_D": 64, "num_warps": 4}])


# The state kernel at 4 warps: at 2 (and at BLOCK_D=16, 1 warp) it spills on sm_90a
# (docs/kernels.md, compile figures).
@triton.autotune(configs=kernel_configs("gated_scan_chunk_state", {"BLOCK_D": 32, "num_warps": 4},
                                        [{"BLOCK_D": 32, "num_warps": 1}, {"BLOCK_D": 64, "num_warps": 4}]),
                 key=["D", "BLOCK_N", "CHUNK"])
@triton.jit
def _chunk_state_kernel(U, F, BM, CM, S, G,
                        L, INNER, D, N, NC,
                        sx_b, sx_o, sx_i, sn_b, sn_o, sn_i,
                        REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr):
    """S[b, c] and G[b, c], the state lanes in tiles of TILE_N, one pass over the chunk each: a
    [BLOCK_D, BLOCK_N] state spreads a warp along N, so at BLOCK_N=64 every thread held BLOCK_D / warps
    channels of the state and of each per-channel gate, and spilled (docs/kernels.md, compile figures)."""
    c, pid_d, b, start, end, offs_d, offs_n, mask_d, mask_n, base_x, base_n = _chunk_program(
        L, D, N, sx_b, sn_b, CHUNK, BLOCK_D, TILE_N)
    row = (b.to(tl.int64) * NC + c) * D + offs_d
    for n0 in tl.static_range(0, BLOCK_N, TILE_N):
        lanes = n0 + offs_n
        h = tl.zeros([BLOCK_D, TILE_N], tl.float32)
        log_decay = tl.zeros([BLOCK_D], tl.float32)  # the last pass's is stored (the compiler drops the others)
        for k in range(start, end):
            ox, on, u, log_a, a, one_minus_a, bm, cm = _load_token(
                k, U, F, BM, CM, L, INNER, base_x, base_n, sx_o, sx_i, sn_o, sn_i,
                offs_d, lanes, mask_d, lanes < N, REVERSE, READ_CM=False)
            h = a[:, None] * h + (one_minus_a * u)[:, None] * bm[None, :]
            log_decay += log_a
        tl.store(S + row[:, None] * N + lanes[None, :], h, mask=mask_d[:, None] & (lanes < N)[None, :])
    tl.store(G + row, log_decay, mask=mask_d)


# 8 warps for 128 elements: 4 warps, or 256 elements at 8, spill on sm_90a (docs/kernels.md, compile figures).
@triton.autotune(configs=kernel_configs("gated_scan_chunk_carry", {"BLOCK_E": 128, "num_warps": 8},
                                        [{"BLOCK_E": 64, "num_warps": 2}, {"BLOCK_E": 64, "num_warps": 4}]),
                 key=["DN", "NC"])
@triton.jit
def _chunk_carry_kernel(S, G, INIT, OUT, DN, N, NC,
                        HAS_INIT: tl.constexpr, REVERSE_CHUNKS: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """OUT[b, c] = exp(G[b, c]) * OUT[b, c -/+ 1] + S[b, c], chunks visited in order (or in
    reverse), starting from INIT[b] (or zero). Elements are the flattened (d, n) pairs."""
    pid_e, b = tl.program_id(0), tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < DN
    D = DN // N
    offs_d = offs_e // N
    if HAS_INIT:
        h = tl.load(INIT + b.to(tl.int64) * DN + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_E], tl.float32)
    rows = tl.arange(0, BLOCK_C)
    for c0 in range(0, NC, BLOCK_C):
        step = c0 + rows
        if REVERSE_CHUNKS:
            chunk = NC - 1 - step
        else:
            chunk = step
        chunk_row = b.to(tl.int64) * NC + chunk
        mask = (step < NC)[:, None] & mask_e[None, :]
        # rows past the end load as the identity map (decay 1, offset 0)
        decay = tl.exp(tl.load(G + chunk_row[:, None] * D + offs_d[None, :], mask=mask, other=0.0))
        ptr = chunk_row[:, None] * DN + offs_e[None, :]
        offset = tl.load(S + ptr, mask=mask, other=0.0)
        decay, offset = tl.associative_scan((decay, offset), 0, _affine_compose)
        states = decay * h[None, :] + offset
        tl.store(OUT + ptr, states, mask=mask)
        h = tl.sum(tl.where(rows[:, None] == BLOCK_C - 1, states, 0.0), axis=0)


@triton.autotune(configs=_chunk_configs("gated_scan_chunk_output"), key=["D", "BLOCK_N", "CHUNK"])
@triton.jit
def _chunk_output_kernel(U, F, BM, CM, Z, DSKIP, H, H0, OUT,
                         L, INNER, D, N, NC,
                         sx_b, sx_o, sx_i, sn_b, sn_o, sn_i,
                         HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
                         REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    c, pid_d, b, start, end, offs_d, offs_n, mask_d, mask_n, base_x, base_n = _chunk_program(
        L, D, N, sx_b, sn_b, CHUNK, BLOCK_D, BLOCK_N)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state = offs_d[:, None] * N + offs_n[None, :]

    h = _state_before_chunk(H, H0, b, c, D, N, NC, state, mask_dn, HAS_H0)
    if HAS_D:
        d_skip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for k in range(start, end):
        ox, on, u, log_a, a, one_minus_a, bm, cm = _load_token(
            k, U, F, BM, CM, L, INNER, base_x, base_n, sx_o, sx_i, sn_o, sn_i,
            offs_d, offs_n, mask_d, mask_n, REVERSE)
        h = a[:, None] * h + (one_minus_a * u)[:, None] * bm[None, :]
        y = tl.sum(h * cm[None, :], axis=1)
        if HAS_D:
            y += d_skip * u
        if HAS_Z:
            y *= tl.sigmoid(tl.load(Z + ox + offs_d, mask=mask_d, other=0.0).to(tl.float32))
        tl.store(OUT + ox + offs_d, y.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def _output_grad(GOUT, Z, ox, offs_d, mask_d, HAS_Z: tl.constexpr):
    """dL/dy_t = dL/dout_t * sigmoid(z_t), and sigmoid(z_t) (1 without z)."""
    g = tl.load(GOUT + ox + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        gate = tl.sigmoid(tl.load(Z + ox + offs_d, mask=mask_d, other=0.0).to(tl.float32))
    else:
        gate = tl.full([g.shape[0]], 1.0, tl.float32)
    return g * gate, gate


@triton.autotune(configs=_chunk_configs("gated_scan_chunk_adjoint"), key=["D", "BLOCK_N", "CHUNK"])
@triton.jit
def _chunk_adjoint_kernel(U, F, BM, CM, Z, GOUT, R,
                          L, INNER, D, N, NC,
                          sx_b, sx_o, sx_i, sn_b, sn_o, sn_i,
                          HAS_Z: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """R[b, c] = a_s lambda_s at the chunk's first token s, with lambda from zero at its end."""
    c, pid_d, b, start, end, offs_d, offs_n, mask_d, mask_n, base_x, base_n = _chunk_program(
        L, D, N, sx_b, sn_b, CHUNK, BLOCK_D, BLOCK_N)

    mu = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # a_{t+1} lambda_{t+1}
    for i in range(start, end):
        k = end - 1 - (i - start)
        ox, on, u, log_a, a, one_minus_a, bm, cm = _load_token(
            k, U, F, BM, CM, L, INNER, base_x, base_n, sx_o, sx_i, sn_o, sn_i,
            offs_d, offs_n, mask_d, mask_n, REVERSE, READ_U_BM=False)
        dy, gate = _output_grad(GOUT, Z, ox, offs_d, mask_d, HAS_Z)
        mu = a[:, None] * (mu + dy[:, None] * cm[None, :])

    row = (b.to(tl.int64) * NC + c) * D + offs_d
    tl.store(R + row[:, None] * N + offs_n[None, :], mu, mask=mask_d[:, None] & mask_n[None, :])


# Two warps, no candidate, for the 64 channels of a block (32 beyond 16 state lanes): 32 channels at N <= 16
# spilled at two warps; 64 spill 1.4-1.7 KB at one warp, 8-24 B at four (docs/kernels.md, compile figures).
@triton.autotune(configs=kernel_configs("gated_scan_chunk_backward", {"num_warps": 2}),
                 key=["D", "BLOCK_N", "CHUNK"])
@triton.jit
def _chunk_backward_kernel(U, F, BM, CM, Z, DSKIP, GOUT, H, H0, M, DHN,
                           DU, QP, DF, DZ, DBM_PART, DCM_PART, DD_PART,
                           L, INNER, D, N, NC,
                           sx_b, sx_o, sx_i, sn_b, sn_o, sn_i, part_stride,
                           HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
                           REVERSE: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """All gradients of one chunk. The forward sweep parks the prefix sums of Q in QP (float32,
    [B, L, D]); the reverse sweep reads each back and writes df to DF in f's dtype (DF may be QP:
    each position is read before it is written). dBm and dCm are summed over channel blocks
    afterwards (one partial per block: no atomics, deterministic)."""
    c, pid_d, b, start, end, offs_d, offs_n, mask_d, mask_n, base_x, base_n = _chunk_program(
        L, D, N, sx_b, sn_b, CHUNK, BLOCK_D, BLOCK_N)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    part = pid_d.to(tl.int64) * part_stride  # this channel block's dBm / dCm partial
    state = offs_d[:, None] * N + offs_n[None, :]

    h = _state_before_chunk(H, H0, b, c, D, N, NC, state, mask_dn, HAS_H0)
    # rho: the adjoint flowing into h_{e-1} from the chunks after this one, M[b, c+1] or dL/dh_final
    rho = tl.load(M + (b.to(tl.int64) * NC + tl.minimum(c + 1, NC - 1)) * D * N + state, mask=mask_dn, other=0.0)
    final = tl.load(DHN + b.to(tl.int64) * D * N + state, mask=mask_dn, other=0.0)
    rho = tl.where(c < NC - 1, rho, final)
    if HAS_D:
        d_skip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        d_skip = tl.zeros([BLOCK_D], tl.float32)

    q_prefix = tl.zeros([BLOCK_D], tl.float32)
    dd = tl.zeros([BLOCK_D], tl.float32)
    for k in range(start, end):
        ox, on, u, log_a, a, one_minus_a, bm, cm = _load_token(
            k, U, F, BM, CM, L, INNER, base_x, base_n, sx_o, sx_i, sn_o, sn_i,
            offs_d, offs_n, mask_d, mask_n, REVERSE)
        h = a[:, None] * h + (one_minus_a * u)[:, None] * bm[None, :]
        hc = tl.sum(h * cm[None, :], axis=1)
        dy, gate = _output_grad(GOUT, Z, ox, offs_d, mask_d, HAS_Z)
        if HAS_Z:
            # out = y sigmoid(z): dz = dout * y * sigmoid(z) (1 - sigmoid(z)) = dy * y * (1 - sigmoid(z))
            tl.store(DZ + ox + offs_d, (dy * (hc + d_skip * u) * (1.0 - gate)).to(DZ.dtype.element_ty),
                     mask=mask_d)
        tl.store(DCM_PART + part + on + offs_n, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
        dd += dy * u
        tl.store(QP + ox + offs_d, q_prefix, mask=mask_d)
        q_prefix += dy * hc
    # sum_{s=t}^{e-1} Q_s + rho . h_{e-1} = q_total - q_prefix_{t-1}
    q_total = q_prefix + tl.sum(rho * h, axis=1)
    tl.store(DD_PART + (b.to(tl.int64) * NC + c) * D + offs_d, dd, mask=mask_d)
    tl.debug_barrier()

    mu = rho  # a_{t+1} lambda_{t+1}
    k_suffix = tl.zeros([BLOCK_D], tl.float32)
    for i in range(start, end):
        k = end - 1 - (i - start)
        ox, on, u, log_a, a, one_minus_a, bm, cm = _load_token(
            k, U, F, BM, CM, L, INNER, base_x, base_n, sx_o, sx_i, sn_o, sn_i,
            offs_d, offs_n, mask_d, mask_n, REVERSE)
        dy, gate = _output_grad(GOUT, Z, ox, offs_d, mask_d, HAS_Z)
        lam = mu + dy[:, None] * cm[None, :]
        lam_b = tl.sum(lam * bm[None, :], axis=1)
        write = one_minus_a * u
        k_t = write * lam_b  # dL/dlog(1 - a_t)
        k_suffix += k_t
        dlog_a = q_total - tl.load(QP + ox + offs_d, mask=mask_d, other=0.0) - k_suffix
        # d log a / df = 1 - a, d log(1 - a) / df = -a
        tl.store(DF + ox + offs_d, (one_minus_a * dlog_a - a * k_t).to(DF.dtype.element_ty), mask=mask_d)
        tl.store(DU + ox + offs_d, (dy * d_skip + one_minus_a * lam_b).to(DU.dtype.element_ty), mask=mask_d)
        tl.store(DBM_PART + part + on + offs_n, tl.sum(lam * write[:, None], axis=0), mask=mask_n)
        mu = a[:, None] * lam

