"""MambaStyleAttention against a float64 recomputation written out step by step, with the
scan done by the float64 oracle loop ``naive.gated_scan_2d`` (not by either backend)."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import naive
from moe_restore.layers.mamba_attention import MambaStyleAttention
from utils import DEVICE, VISITS, assert_close, backends, scan_2d


def reference_block(block: MambaStyleAttention, x: torch.Tensor) -> torch.Tensor:
    """The block's forward in float64 from its parameters, following the issue's description."""
    p = {name: t.detach().double() for name, t in block.named_parameters()}
    x = x.double()
    inner, rank, state = block.inner, block.rank, block.d_state
    uz = torch.nn.functional.conv2d(x, p["in_proj.weight"], p["in_proj.bias"])
    u, z = uz[:, :inner], uz[:, inner:]
    k = block.conv.kernel_size[0]
    u = torch.nn.functional.conv2d(u, p["conv.weight"], p["conv.bias"], padding=k // 2, groups=inner)
    u = u * torch.sigmoid(u)                                   # SiLU
    u, z = u.permute(0, 2, 3, 1), z.permute(0, 2, 3, 1)        # [B, H, W, E]
    directions = len(block.orders)
    proj = (u @ p["x_proj.weight"].T).unflatten(-1, (directions, rank + 2 * state))
    total = 0
    for i, order in enumerate(list(VISITS)[:directions]):
        f = proj[..., i, :rank] @ p["decay_weight"][i] + p["decay_bias"][i]
        Bm, Cm = proj[..., i, rank:rank + state], proj[..., i, rank + state:]
        total = total + scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, order, d_skip=p["d_skip"][i])[0]
    mean = total.mean(-1, keepdim=True)
    var = ((total - mean) ** 2).mean(-1, keepdim=True)
    normed = (total - mean) / torch.sqrt(var + block.norm.eps) * p["norm.weight"] + p["norm.bias"]
    y = (normed * torch.sigmoid(z)).permute(0, 3, 1, 2)
    return torch.nn.functional.conv2d(y, p["out_proj.weight"], p["out_proj.bias"])


def make_block(directions, backend, **kw):
    torch.manual_seed(directions)
    block = MambaStyleAttention(6, d_state=3, directions=directions, backend=backend, **kw).to(DEVICE)
    with torch.no_grad():  # move the LayerNorm off its identity initialisation
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.2, 0.2)
    return block


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("directions", [1, 2, 4])
def test_block_matches_reference(backend, directions):
    block = make_block(directions, backend)
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, reference_block(block, x), torch.float32, backend=backend, what="block output")


def test_block_float64_torch_backend():
    block = make_block(4, None, d_conv=5, expand=1).double()
    x = torch.randn(1, 6, 4, 7, device=DEVICE, dtype=torch.float64)
    assert_close(block(x), reference_block(block, x), torch.float64, what="block output")


@pytest.mark.parametrize("backend", backends())
def test_block_gradients_reach_every_parameter(backend):
    block = make_block(2, backend)
    x = torch.randn(1, 6, 4, 3, device=DEVICE, requires_grad=True)
    block(x).square().sum().backward()
    for name, param in [("x", x), *block.named_parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"
    # and they are the reference's gradients
    ref_block = make_block(2, backend)
    x64 = x.detach().double().requires_grad_()
    reference_block(ref_block, x64).square().sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, backend=backend, what="dx")


def test_block_initial_decay_is_long_memory():
    block = MambaStyleAttention(32)
    a = torch.sigmoid(block.decay_bias)
    assert a.min() >= 0.8 - 1e-6 and a.max() <= 0.99 + 1e-6
    assert block.rank == 2 and block.inner == 64 and block.orders == tuple(VISITS.values())


def test_block_rejects_bad_arguments():
    with pytest.raises(ValueError, match="directions must be one of"):
        MambaStyleAttention(8, directions=3)
    with pytest.raises(ValueError, match="d_conv must be odd"):
        MambaStyleAttention(8, d_conv=4)
    with pytest.raises(TypeError, match="d_state must be an int"):
        MambaStyleAttention(8, d_state=2.5)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        MambaStyleAttention(0)
    with pytest.raises(ValueError, match="backend must be one of .* got 'trition'"):
        MambaStyleAttention(8, backend="trition")
    with pytest.raises(ValueError, match=r"x must have shape \[B, 8, H, W\]"):
        MambaStyleAttention(8)(torch.randn(1, 4, 3, 3))
