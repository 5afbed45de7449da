"""The torch backend decides once per eager call whether ``torch._grouped_mm`` runs its grouped
products (``native_call``, from the two weights alone). That decision must be the one the
per-product rule ``_native`` gives for every product the call makes, forward and backward, on
the operands as the call makes them (fresh rows of x, z, h, the upstream gradient and dz, and
the weights with their transposes)."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels._moe_mlp_torch import _native, _stored_transposed, native_call


def _weight(E: int, n_in: int, n_out: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """An [E, in, out] weight: contiguous, a transposed view of [E, out, in] storage (as
    transformers keeps its experts), or contiguous but one element past an aligned pointer."""
    if layout == "transposed":
        return torch.randn(E, n_out, n_in, dtype=dtype).transpose(1, 2)
    if layout == "offset":
        return torch.randn(E * n_in * n_out + 1, dtype=dtype)[1:].view(E, n_in, n_out)
    return torch.randn(E, n_in, n_out, dtype=dtype)


def _per_product(w1: torch.Tensor, w2: torch.Tensor, N: int = 6) -> list[bool]:
    """``_native`` of each grouped product of one call: z = x[t] @ w1, o = h @ w2, dh = g @ w2^T,
    dW1 = x[t]^T dz, dW2 = h^T g, du = dz @ w1^T (each fresh [N, width] operand as the op makes it)."""
    (E, D, W), (_, H, D_out) = w1.shape, w2.shape
    rows = {n: torch.empty(N, n, dtype=w1.dtype) for n in (D, W, H, D_out)}
    x_t, z, h, g = rows[D], rows[W], rows[H], rows[D_out]
    t1, t2 = _stored_transposed(w1), _stored_transposed(w2)
    return [_native(x_t, w1, W), _native(h, w2, D_out), _native(g, w2.transpose(1, 2), H),
            _native(x_t, z, D if t1 else W), _native(h, g, H if t2 else D_out), _native(z, w1.transpose(1, 2), D)]


CASES = [  # dtype, D, H (w1 holds 2H: gated), D_out, layout of w1, layout of w2
    (torch.float32, 16, 24, 16, "transposed", "transposed"),
    (torch.float32, 16, 24, 16, "contiguous", "contiguous"),
    (torch.float32, 16, 6, 16, "transposed", "transposed"),    # H = 6: rows of 24 bytes
    (torch.float32, 5, 8, 7, "contiguous", "contiguous"),      # odd widths
    (torch.float32, 16, 24, 16, "offset", "contiguous"),       # w1 off the 16-byte grid
    (torch.float32, 16, 24, 16, "contiguous", "offset"),
    (torch.bfloat16, 16, 8, 16, "transposed", "transposed"),
    (torch.bfloat16, 16, 12, 16, "transposed", "transposed"),  # 2H = 24 values: 48 bytes, H: 24
    (torch.float16, 8, 4, 8, "contiguous", "contiguous"),      # rows of 8 bytes
    (torch.float64, 16, 24, 16, "transposed", "transposed"),   # no float64 kernel
]


@pytest.mark.parametrize("dtype,D,H,D_out,layout1,layout2", CASES)
def test_one_decision_per_call_is_every_products_decision(dtype, D, H, D_out, layout1, layout2):
    w1 = _weight(3, D, 2 * H, dtype, layout1)
    w2 = _weight(3, H, D_out, dtype, layout2)
    assert native_call(w1, w2) == all(_per_product(w1, w2))


def test_the_cases_take_both_answers():
    """The cases above are not all one answer (a rule that always says the same would pass)."""
    answers = {native_call(_weight(3, D, 2 * H, dt, l1), _weight(3, H, Do, dt, l2)) for dt, D, H, Do, l1, l2 in CASES}
    assert answers == {True, False}


@pytest.mark.parametrize("shape", [(3, 16, 24), (1, 16, 24), (3, 1, 24), (3, 16, 1)])
def test_stored_transposed_reads_the_layout_off_the_strides(shape):
    """``_stored_transposed`` (no transposed view made to ask) against the definition: not
    contiguous, and its transpose is (size-1 axes included, whose strides do not matter)."""
    E, n_in, n_out = shape
    for w in (torch.randn(E, n_out, n_in).transpose(1, 2), torch.randn(E, n_in, n_out),
              torch.randn(n_in, E, n_out).transpose(0, 1)):
        assert _stored_transposed(w) == (not w.is_contiguous() and w.transpose(1, 2).is_contiguous())
