"""Float64 oracle pieces shared by the MoE layer tests: plain per-token loops, written from the math
of the layers' docstrings (not from the layers' code), differentiable by autograd in float64."""
from __future__ import annotations

import torch

from moe_restore.kernels import naive
from moe_restore.layers import TopKMoE
from utils import DEVICE, assert_close


def float64_params(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Leaf float64 copies of the layer's parameters, by name, on the CPU."""
    return {name: p.detach().double().cpu().requires_grad_() for name, p in layer.named_parameters()}


def softmax64(v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(v.double(), dim=-1)


def top_indices(p: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries of the vector p, the lower index first on ties."""
    return naive.stable_top_k(p, k)[1].tolist()


activation64 = naive.activate


def expert64(params: dict[str, torch.Tensor], prefix: str, e: int, u: torch.Tensor, activation: str) -> torch.Tensor:
    """Expert e of the bank whose parameters are named prefix + w1/b1/w2/b2, on one token u."""
    b1, b2 = (params[prefix + name][e] if prefix + name in params else None for name in ("b1", "b2"))
    return naive.expert_mlp(u, params[prefix + "w1"][e], b1, params[prefix + "w2"][e], b2, activation)


def shared64(params: dict[str, torch.Tensor], u: torch.Tensor, activation: str, out_dim: int) -> torch.Tensor:
    """Shared(u) = act(u @ w1 + b1) @ w2 + b2 of the layer's dense shared expert, 0 without one."""
    if "shared_expert.w1" not in params:
        return torch.zeros(out_dim, dtype=torch.float64)
    z = u @ params["shared_expert.w1"]
    if "shared_expert.b1" in params:
        z = z + params["shared_expert.b1"]
    out = activation64(z, activation) @ params["shared_expert.w2"]
    return out + params["shared_expert.b2"] if "shared_expert.b2" in params else out


def random_input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype).requires_grad_()


def assert_gradients_close(layer: torch.nn.Module, params64: dict[str, torch.Tensor], x: torch.Tensor,
                           x64: torch.Tensor, backend: str) -> None:
    """Every parameter's gradient and the input's against the oracle's (after both backward passes)."""
    assert_close(x.grad, x64.grad, x.dtype, backend=backend, what="grad x")
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert_close(p.grad, params64[name].grad, p.dtype, backend=backend, what=f"grad {name}")


def assert_compiled_layer_matches_eager(layer: torch.nn.Module, x: torch.Tensor, *args: torch.Tensor) -> None:
    """torch.compile(fullgraph=True) traces the layer without graph breaks, and the compiled
    layer's output, aux_loss and gradients equal the eager layer's."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for run in (compiled, layer):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = run(x, *args)
        (y.square().sum() + layer.aux_loss).backward()
        results.append((y.detach(), layer.aux_loss.detach(), x.grad, [p.grad for p in layer.parameters()]))
    (y, aux, dx, grads), (y_eager, aux_eager, dx_eager, grads_eager) = results
    assert torch.equal(y, y_eager) and torch.equal(aux, aux_eager) and torch.equal(dx, dx_eager)
    for got, want in zip(grads, grads_eager):
        assert torch.equal(got, want)


# The token layout of x [..., dim]: to [T, dim] and back.
TOKENS = (lambda x: x.reshape(-1, x.shape[-1]), lambda y, x: y.reshape(*x.shape[:-1], -1))


def oracle_topk_moe(layer: TopKMoE, params: dict[str, torch.Tensor], tokens: torch.Tensor):
    """(y [T, out_dim], aux_loss, router_z_loss, chosen experts per token) in float64, token by token."""
    T, E, k = tokens.shape[0], layer.experts.num_experts, layer.router.top_k
    outputs, chosen, probs = [], [], []
    counts = [0] * E
    z_loss = torch.zeros((), dtype=torch.float64)
    for t in range(T):
        u = tokens[t]
        logits = params["router.weight"] @ u
        if layer.router.scoring == "softmax":
            p = softmax64(logits)
            probs.append(p)
        else:
            p = 1 / (1 + torch.exp(-logits))
            probs.append(p / p.sum())
        experts = top_indices(p, k)
        weights = torch.stack([p[e] for e in experts])
        weights = weights / weights.sum()
        y = shared64(params, u, layer.experts.activation, layer.out_dim)
        for w, e in zip(weights, experts):
            y = y + w * expert64(params, "experts.", e, u, layer.experts.activation)
            counts[e] += 1
        outputs.append(y)
        chosen.append(experts)
        z_loss = z_loss + torch.log(torch.exp(logits).sum()) ** 2
    mean_p = torch.stack(probs).mean(dim=0)
    aux = E * sum(counts[e] / (T * k) * mean_p[e] for e in range(E))
    return torch.stack(outputs), aux, z_loss / T, chosen
