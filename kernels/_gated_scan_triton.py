"""Launches of the gated-scan kernels (``_gated_scan_kernels``, where the math is) and the custom
ops with autograd over them."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from . import settings
from ._backend import refuse_double_backward
from ._gated_scan_kernels import (_chunk_adjoint_kernel, _chunk_backward_kernel, _chunk_carry_kernel,
                                  _chunk_output_kernel, _chunk_state_kernel)
from ._reductions import sum_splits


def chunk_length(length: int) -> int:
    """Tokens per chunk: enough chunks to fill a GPU, long enough that the chunk states
    (4 * D * N float32 per chunk, written and read twice) stay small beside the inputs.
    ``MOE_RESTORE_SCAN_CHUNK`` pins it (see ``settings``)."""
    return settings.scan_chunk(min(256, max(64, triton.next_power_of_2(triton.cdiv(length, 512)))))


def carry_block() -> int:
    """Chunk states the carry kernel combines per step (``MOE_RESTORE_SCAN_CARRY_BLOCK`` pins it)."""
    return settings.scan_carry_block()


def _backward_block_d(block_n: int) -> int:
    """Channels per program of the chunk backward (at 2 warps), fixed (not tuned): the dBm/dCm partial
    buffers are sized by the number of channel blocks, and each block writes a float32 [B, L, N] partial
    of both that the sum kernel reads back, so wide blocks cut that traffic (D=192: 3 blocks, not 6 at 32).
    Beyond 16 state lanes 64 channels take 241-248 registers on sm_90a (N=64); 32 take at most 220."""
    return 64 if block_n <= 16 else 32


class _Geometry:
    """How the kernels walk a [B, H, W, C] grid: sizes, visit order and strides."""

    def __init__(self, u: torch.Tensor, bm: torch.Tensor, column_major: bool, reverse: bool):
        self.batch, height, width, self.d = u.shape
        self.n = bm.shape[-1]
        self.length = height * width
        self.reverse = reverse
        self.chunk = chunk_length(self.length)
        self.n_chunks = triton.cdiv(self.length, self.chunk)
        self.block_n = triton.next_power_of_2(self.n)
        outer, inner = (2, 1) if column_major else (1, 2)
        self.inner = u.shape[inner]
        self.args = (self.length, self.inner, self.d, self.n, self.n_chunks,
                     u.stride(0), u.stride(outer), u.stride(inner),
                     bm.stride(0), bm.stride(outer), bm.stride(inner))

    def grid(self, meta):
        return (self.n_chunks, triton.cdiv(self.d, meta["BLOCK_D"]), self.batch)

    def carry_grid(self, meta):
        return (triton.cdiv(self.d * self.n, meta["BLOCK_E"]), self.batch)

    def carry(self, s: torch.Tensor, g: torch.Tensor, init: torch.Tensor | None, reverse_chunks: bool):
        out = torch.empty_like(s)
        _chunk_carry_kernel[self.carry_grid](s, g, s if init is None else init, out,
                                             self.d * self.n, self.n, self.n_chunks,
                                             HAS_INIT=init is not None, REVERSE_CHUNKS=reverse_chunks,
                                             BLOCK_C=carry_block())
        return out

    def chunk_buffers(self, device: torch.device):
        b, nc, d, n = self.batch, self.n_chunks, self.d, self.n
        return (torch.empty(b, nc, d, n, device=device, dtype=torch.float32),
                torch.empty(b, nc, d, device=device, dtype=torch.float32))


def _scan_forward(u, f, bm, cm, d_skip, z, h0, geo: _Geometry):
    """Run the forward kernels; returns (out, chunk end states H [B, NC, D, N], log decays G)."""
    states, log_decay = geo.chunk_buffers(u.device)
    flags = dict(REVERSE=geo.reverse, CHUNK=geo.chunk, BLOCK_N=geo.block_n)
    _chunk_state_kernel[geo.grid](u, f, bm, cm, states, log_decay, *geo.args, TILE_N=min(geo.block_n, 16), **flags)
    ends = geo.carry(states, log_decay, h0, reverse_chunks=False)
    out = torch.empty_like(u)
    _chunk_output_kernel[geo.grid](u, f, bm, cm, u if z is None else z, u if d_skip is None else d_skip,
                                   ends, u if h0 is None else h0, out, *geo.args,
                                   HAS_Z=z is not None, HAS_D=d_skip is not None, HAS_H0=h0 is not None,
                                   **flags)
    return out, ends, log_decay


def _scan_backward(grad_out, grad_final, u, f, bm, cm, d_skip, z, h0, ends, log_decay, geo: _Geometry):
    """Run the backward kernels (grad_final: float32 [B, D, N], zeros when the final state is
    unused); returns (du, df, dBm, dCm, dd_skip, dz, dh0), None where the input was None;
    d_skip and h0 gradients in float32, the others in their input's dtype."""
    flags = dict(REVERSE=geo.reverse, CHUNK=geo.chunk, BLOCK_N=geo.block_n)
    dummy = u
    partial, _ = geo.chunk_buffers(u.device)
    _chunk_adjoint_kernel[geo.grid](u, f, bm, cm, dummy if z is None else z, grad_out, partial, *geo.args,
                                    HAS_Z=z is not None, **flags)
    adjoints = geo.carry(partial, log_decay, grad_final, reverse_chunks=True)
    del partial

    block_d = _backward_block_d(geo.block_n)
    n_blocks = triton.cdiv(geo.d, block_d)
    du, dz = torch.empty_like(u), (torch.empty_like(z) if z is not None else None)
    # The kernel parks float32 prefix sums in q_prefix and writes df in f's dtype (in place when float32).
    q_prefix = torch.empty(f.shape, device=f.device, dtype=torch.float32)
    df = q_prefix if f.dtype == torch.float32 else torch.empty_like(f)
    dbm_part = torch.empty((n_blocks, *bm.shape), device=bm.device, dtype=torch.float32)
    dcm_part = torch.empty_like(dbm_part)
    dd_part = torch.empty(geo.batch, geo.n_chunks, geo.d, device=u.device, dtype=torch.float32)
    _chunk_backward_kernel[(geo.n_chunks, n_blocks, geo.batch)](
        u, f, bm, cm, dummy if z is None else z, dummy if d_skip is None else d_skip, grad_out,
        ends, dummy if h0 is None else h0, adjoints, grad_final,
        du, q_prefix, df, dummy if dz is None else dz, dbm_part, dcm_part, dd_part,
        *geo.args, dbm_part.stride(0),
        HAS_Z=z is not None, HAS_D=d_skip is not None, HAS_H0=h0 is not None,
        BLOCK_D=block_d, **flags)
    dd = dd_part.sum(dim=(0, 1)) if d_skip is not None else None
    dh0 = adjoints[:, 0].clone() if h0 is not None else None
    return du, df, sum_splits(dbm_part, bm.dtype), sum_splits(dcm_part, cm.dtype), dd, dz, dh0


# The Triton path as custom ops (with fake implementations), so that torch.compile traces it
# without graph breaks. Inputs are [B, H, W, C] grids (a 1-D sequence is [B, 1, L, C]), with
# u, f, z contiguous alike and Bm, Cm contiguous alike; d_skip and h0 float32.

@torch.library.custom_op("moe_restore::gated_scan", mutates_args=())
def gated_scan_forward(u: torch.Tensor, f: torch.Tensor, bm: torch.Tensor, cm: torch.Tensor,
                       d_skip: Optional[torch.Tensor], z: Optional[torch.Tensor], h0: Optional[torch.Tensor],
                       column_major: bool, reverse: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, final state [B, D, N], chunk end states [B, NC, D, N], chunk log decays [B, NC, D]);
    the last two are what the backward keeps: nothing of size [B, L, D, N]."""
    out, ends, log_decay = _scan_forward(u, f, bm, cm, d_skip, z, h0, _Geometry(u, bm, column_major, reverse))
    return out, ends[:, -1].clone(), ends, log_decay


@gated_scan_forward.register_fake
def _(u, f, bm, cm, d_skip, z, h0, column_major, reverse):
    batch, height, width, dim = u.shape
    n_chunks = triton.cdiv(height * width, chunk_length(height * width))
    state = u.new_empty(batch, n_chunks, dim, bm.shape[-1], dtype=torch.float32)
    return (torch.empty_like(u), state.new_empty(batch, dim, bm.shape[-1]), state,
            state.new_empty(batch, n_chunks, dim))


@torch.library.custom_op("moe_restore::gated_scan_backward", mutates_args=())
def gated_scan_backward(grad_out: torch.Tensor, grad_final: torch.Tensor, u: torch.Tensor, f: torch.Tensor,
                        bm: torch.Tensor, cm: torch.Tensor, d_skip: Optional[torch.Tensor],
                        z: Optional[torch.Tensor], h0: Optional[torch.Tensor], ends: torch.Tensor,
                        log_decay: torch.Tensor, column_major: bool, reverse: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    """(du, df, dBm, dCm, dd_skip, dz, dh0); the gradient of a missing input is an empty tensor."""
    grads = _scan_backward(grad_out, grad_final, u, f, bm, cm, d_skip, z, h0, ends, log_decay,
                           _Geometry(u, bm, column_major, reverse))
    return tuple(u.new_empty(0) if g is None else g for g in grads)


@gated_scan_backward.register_fake
def _(grad_out, grad_final, u, f, bm, cm, d_skip, z, h0, ends, log_decay, column_major, reverse):
    def like(t, dtype=None):
        return u.new_empty(0) if t is None else t.new_empty(t.shape, dtype=dtype or t.dtype)

    return (torch.empty_like(u), like(f), like(bm), like(cm), like(d_skip, torch.float32), like(z),
            like(h0, torch.float32))


def _setup_context(ctx, inputs, output):
    u, f, bm, cm, d_skip, z, h0, column_major, reverse = inputs
    _, _, ends, log_decay = output
    ctx.save_for_backward(u, f, bm, cm, d_skip, z, h0, ends, log_decay)
    ctx.layout = (column_major, reverse)
    # Unused outputs get None, not zeros: autograd would otherwise write a zero gradient for the
    # chunk states and decays (4 * NC * D * (N + 1) bytes per sequence) that the backward ignores.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_final, _grad_ends, _grad_log_decay):
    u, f, bm, cm, d_skip, z, h0, ends, log_decay = ctx.saved_tensors
    grad_out = torch.zeros_like(u) if grad_out is None else grad_out.contiguous()
    if grad_final is None:
        grad_final = ends.new_zeros(ends.shape[0], *ends.shape[2:])
    grad_final = grad_final.float().contiguous()
    du, df, dbm, dcm, dd, dz, dh0 = gated_scan_backward(grad_out, grad_final, u, f, bm, cm, d_skip, z, h0,
                                                        ends, log_decay, *ctx.layout)
    present = lambda grad, t: None if t is None else grad  # noqa: E731
    return du, df, dbm, dcm, present(dd, d_skip), present(dz, z), present(dh0, h0), None, None


gated_scan_forward.register_autograd(_backward, setup_context=_setup_context)
gated_scan_backward.register_autograd(refuse_double_backward("gated_scan", "use backend='torch', which supports it"))
