"""router_loss_stats against the float64 oracle ``naive.router_loss_stats``, on every backend
runnable here: the sums and their gradients, odd shapes, strided logits, both scorings."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import naive, router_loss_stats
from utils import DEVICE, assert_close, backends, poisoned_allocations

SHAPES = [(1, 1), (1, 8), (37, 5), (130, 20), (70, 64), (9, 130), (300, 8)]  # (T, E): one token, padded tiles, E > 128, 3 programs


def _logits(T: int, E: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(T, E, generator=g)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E", SHAPES)
def test_sums_and_gradients_match_the_oracle(backend, scoring, dtype, T, E):
    logits = _logits(T, E, dtype, seed=T * 1000 + E).requires_grad_()
    with poisoned_allocations():
        prob_sums, lse_sq_sum = router_loss_stats(logits, scoring, backend=backend)
    ref_logits = logits.detach().double().cpu().requires_grad_()
    ref_probs, ref_lse = naive.router_loss_stats(ref_logits, scoring)
    assert prob_sums.dtype == lse_sq_sum.dtype == torch.float32
    assert prob_sums.shape == (E,) and lse_sq_sum.shape == ()
    # Sums of float32 values: float32's tolerance whatever the logits' dtype (the oracle reads the same rounded logits).
    assert_close(prob_sums, ref_probs, torch.float32, backend=backend, what="prob_sums")
    assert_close(lse_sq_sum, ref_lse, torch.float32, backend=backend, what="lse_sq_sum")

    g = torch.Generator().manual_seed(7)
    dprobs, dlse = torch.randn(E, generator=g, dtype=torch.float64), torch.randn((), generator=g, dtype=torch.float64)
    with poisoned_allocations():
        (prob_sums * dprobs.float().to(DEVICE)).sum().add(lse_sq_sum * dlse.float().to(DEVICE)).backward()
    ((ref_probs * dprobs).sum() + ref_lse * dlse).backward()
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, ref_logits.grad, dtype, backend=backend, what="dlogits")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("pick", [0, 1])
def test_one_output_alone_from_strided_logits(backend, scoring, pick):
    """Backward through one output only (the other's gradient is absent), from a transposed view."""
    raw = _logits(11, 24, torch.float32, seed=3).requires_grad_()
    weight = torch.randn(11, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = router_loss_stats(raw.t(), scoring, backend=backend)[pick]  # logits [24, 11], strides (1, 24)
    (out * weight.float().to(DEVICE)[: out.numel()].reshape(out.shape)).sum().backward()
    ref = raw.detach().double().cpu().requires_grad_()
    ref_out = naive.router_loss_stats(ref.t(), scoring)[pick]
    (ref_out * weight[: ref_out.numel()].reshape(ref_out.shape)).sum().backward()
    assert_close(raw.grad, ref.grad, torch.float32, backend=backend, what=f"dlogits of output {pick}")


@pytest.mark.parametrize("backend", backends())
def test_no_tokens_gives_zeros(backend):
    logits = torch.zeros(0, 6, device=DEVICE, requires_grad=True)
    prob_sums, lse_sq_sum = router_loss_stats(logits, "softmax", backend=backend)
    assert torch.equal(prob_sums.cpu(), torch.zeros(6)) and lse_sq_sum.item() == 0.0
    (prob_sums.sum() + lse_sq_sum).backward()
    assert logits.grad.shape == (0, 6)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="scoring"):
        router_loss_stats(torch.zeros(2, 3), "relu")
    with pytest.raises(ValueError, match="at least one expert"):
        router_loss_stats(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        router_loss_stats(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError):
        router_loss_stats(torch.zeros(2, 3, dtype=torch.int64))
