"""Restormer blocks, ADEC and the degradation encoder: values against plain float64 oracles,
shapes, and gradients (gradcheck in float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from utils import assert_close, backends

from moe_restore.data import degradations
from moe_restore.kernels import naive
from moe_restore.layers.adec import ADEC
from moe_restore.layers.degradation_encoder import DegradationEncoder, image_statistics
from moe_restore.layers.routers import balance_loss
from moe_restore.layers.restormer_blocks import (
    Downsample,
    GatedDconvFFN,
    LayerNorm2d,
    TransformerBlock,
    TransposedAttention,
    Upsample,
)

torch.manual_seed(0)


def _layer_norm_oracle(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    w, b = norm.norm.weight.view(1, -1, 1, 1), norm.norm.bias.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + norm.norm.eps) * w + b


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values for every parameter (norm weights 1 and zero biases hide mistakes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def test_layer_norm_2d_and_ffn_match_formulas():
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    norm = _randomize(LayerNorm2d(6).double())
    assert_close(norm(x), _layer_norm_oracle(x, norm), torch.float64)
    ffn = _randomize(GatedDconvFFN(6, expansion=1.5).double())
    hidden = int(6 * 1.5)
    z = F.conv2d(x, ffn.project_in.weight, ffn.project_in.bias)
    z = F.conv2d(z, ffn.dwconv.weight, ffn.dwconv.bias, padding=1, groups=2 * hidden)
    expected = F.conv2d(F.gelu(z[:, :hidden]) * z[:, hidden:], ffn.project_out.weight, ffn.project_out.bias)
    assert_close(ffn(x), expected, torch.float64)


def test_transposed_attention_matches_a_loop_over_heads():
    b, c, h, w, heads = 2, 6, 5, 3, 3
    attn = _randomize(TransposedAttention(c, heads).double())
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    qkv = F.conv2d(F.conv2d(x, attn.qkv.weight, attn.qkv.bias), attn.qkv_dwconv.weight, attn.qkv_dwconv.bias,
                   padding=1, groups=3 * c)
    q, k, v = qkv.chunk(3, dim=1)
    ch = c // heads
    out = torch.zeros(b, c, h * w, dtype=torch.float64)
    for n in range(b):
        for head in range(heads):
            rows = slice(head * ch, (head + 1) * ch)
            qh, kh, vh = (t[n, rows].reshape(ch, h * w) for t in (q, k, v))
            qh = qh / qh.norm(dim=1, keepdim=True)
            kh = kh / kh.norm(dim=1, keepdim=True)
            scores = torch.zeros(ch, ch, dtype=torch.float64)
            for i in range(ch):
                for j in range(ch):
                    scores[i, j] = (qh[i] * kh[j]).sum() * attn.temperature[head, 0, 0]
            out[n, rows] = scores.softmax(dim=1) @ vh
    expected = F.conv2d(out.view(b, c, h, w), attn.project_out.weight, attn.project_out.bias)
    assert_close(attn(x), expected, torch.float64)


def test_block_shapes_and_gradients():
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    block = _randomize(TransformerBlock(4, TransposedAttention(4, 2), ffn_expansion=1.0).double())
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)
    down, up = Downsample(4).double(), Upsample(8).double()
    y = torch.randn(1, 4, 6, 10, dtype=torch.float64)
    assert down(y).shape == (1, 8, 3, 5) and up(down(y)).shape == (1, 4, 6, 10)
    even = torch.randn(1, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: up(down(t)), (even,), eps=1e-6, atol=1e-5)


def _adec_oracle(adec: ADEC, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """out = x + sum_k w_k Expert_k(u) + Shared(u), pixel by pixel, experts by their formula."""
    b, c, h, w = x.shape
    u = _layer_norm_oracle(x, adec.norm)
    proj = F.gelu(context @ adec.context_proj[0].weight.T + adec.context_proj[0].bias)
    router, experts, shared = adec.moe.router, adec.moe.experts, adec.moe.shared_expert
    out = x.clone()
    for n in range(b):
        for i in range(h):
            for j in range(w):
                feature = u[n, :, i, j]
                # router over the concatenation [u ; proj(c)]
                logits = router.weight @ torch.cat([feature, proj[n]]) + router.bias
                p = logits.softmax(0)
                chosen = naive.stable_top_k(p, router.top_k)[1].tolist()
                total = sum(float(p[e]) for e in chosen)
                for e in chosen:
                    expert = naive.expert_mlp(feature, experts.w1[e], experts.b1[e], experts.w2[e], experts.b2[e],
                                              "gelu")
                    out[n, :, i, j] += float(p[e]) / total * expert.to(out.dtype)
                dense = naive.expert_mlp(feature, shared.w1, shared.b1, shared.w2, shared.b2, "gelu")
                out[n, :, i, j] += dense.to(out.dtype)
    return out


@pytest.mark.parametrize("backend", backends())
def test_adec_matches_a_per_pixel_oracle(backend):
    dtype = torch.float32
    adec = _randomize(ADEC(5, 7, num_experts=4, top_k=2, expansion=1.4, context_proj=3, backend=backend))
    x, context = torch.randn(2, 5, 3, 5), torch.randn(2, 7)
    out = adec(x, context)
    with torch.no_grad():
        expected = _adec_oracle(adec.double(), x.double(), context.double())
    assert out.shape == x.shape
    assert_close(out, expected, dtype, backend=backend, what="ADEC output")
    assert adec.aux_loss is not None and adec.aux_loss.dim() == 0


def test_adec_gradients_reach_every_parameter():
    adec = _randomize(ADEC(4, 3, num_experts=3, top_k=2, expansion=1.0, context_proj=2, backend="torch"))
    x, context = torch.randn(1, 4, 4, 4, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    (adec(x, context).square().mean() + adec.aux_loss).backward()
    for name, p in [("x", x), ("context", context), *adec.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="context"):
        adec(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="top_k"):
        ADEC(4, 3, num_experts=2, top_k=3)


def test_switch_balance_loss_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1], [-1.0, 0.0, 3.0]])
    experts = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 1]])
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    mean_p = [sum(row[e] for row in p) / 4 for e in range(3)]
    fraction = [sum(1 for row in experts.tolist() for a in row if a == e) / 8 for e in range(3)]
    expected = 3 * sum(f * q for f, q in zip(fraction, mean_p))
    counts = torch.bincount(experts.reshape(-1), minlength=3)
    assert abs(float(balance_loss(logits.softmax(-1).mean(0), counts, experts.numel())) - expected) < 1e-6
    uniform = balance_loss(torch.full((3,), 1 / 3), torch.tensor([2, 2, 2]), 6)
    assert abs(float(uniform) - 1.0) < 1e-6


def test_degradation_encoder_shapes_and_gradients():
    encoder = DegradationEncoder(embed_dim=10, num_classes=5, width=4)
    image = torch.rand(3, 3, 23, 17, requires_grad=True)
    embedding, logits = encoder(image)
    assert embedding.shape == (3, 10) and logits.shape == (3, 5)
    F.cross_entropy(logits, torch.tensor([0, 4, 2])).backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(p.grad is not None for p in encoder.parameters())


def _reference_statistics(image: np.ndarray) -> np.ndarray:
    """numpy, one image [C, H, W] with even H, W: the seven statistics per channel, written out."""
    def high_pass(x):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
        h, w = x.shape[1:]
        return x - sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9

    def log_moment(x, power):
        return np.log((x ** power).mean(axis=(1, 2)) + 1e-6)
    c, h, w = image.shape
    half = image.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    across = np.concatenate([image[:, :, 1:] - image[:, :, :-1], np.zeros((c, h, 1))], axis=2)
    down = np.concatenate([image[:, 1:] - image[:, :-1], np.zeros((c, 1, w))], axis=1)
    high = high_pass(image)
    return np.concatenate([log_moment(high, 2), log_moment(high_pass(half), 2), image.mean(axis=(1, 2)),
                           np.log(image.var(axis=(1, 2)) + 1e-6),
                           np.log((high ** 4).mean(axis=(1, 2)) + 1e-12) - 2 * log_moment(high, 2),
                           log_moment(across, 2), log_moment(down, 2)])


def test_image_statistics_match_reference_and_tell_degradations_apart():
    g = torch.Generator().manual_seed(0)
    clean = F.avg_pool2d(torch.rand(1, 3, 36, 44, generator=g), 3, 1, 1)  # some texture
    stats = image_statistics(clean)
    assert stats.shape == (1, 21)
    np.testing.assert_allclose(stats[0].numpy(), _reference_statistics(clean[0].double().numpy()), rtol=1e-4, atol=1e-5)
    noisy = degradations.noise(clean[0], seed=1, strength=0.3)[None]
    blurred = degradations.blur(clean[0], seed=2, strength=0.5)[None]
    dark = 0.3 * clean
    fine = slice(0, 3)
    assert (image_statistics(noisy)[0, fine] > stats[0, fine]).all()
    assert (image_statistics(blurred)[0, fine] < stats[0, fine]).all()
    assert (image_statistics(dark)[0, 6:9] < stats[0, 6:9]).all()
    # log scale: scaling the image by k shifts the energies and the variance by 2 log k
    shift = image_statistics(dark)[0] - stats[0]
    expected = torch.full((3,), 2 * math.log(0.3))
    for part in (slice(0, 3), slice(3, 6), slice(9, 12), slice(15, 18), slice(18, 21)):
        assert torch.allclose(shift[part], expected, atol=1e-2)
    assert torch.allclose(shift[12:15], torch.zeros(3), atol=1e-2), "the kurtosis does not depend on the scale"
    # Gaussian noise on a flat image: high-pass kurtosis near 3; sparse vertical streaks: heavy
    # tails, and more energy across (horizontal differences) than down the streaks
    flat = torch.full((3, 64, 64), 0.5)
    noise_stats = image_statistics(degradations.noise(flat, seed=3, strength=0.3)[None])[0]
    assert torch.allclose(noise_stats[12:15], torch.full((3,), math.log(3.0)), atol=0.15)
    streaks = torch.zeros(1, 3, 64, 64)
    streaks[..., 10:30, 7] = streaks[..., 35:60, 40] = 1.0
    streak_stats = image_statistics(streaks)[0]
    assert (streak_stats[12:15] > math.log(3.0) + 1).all() and (streak_stats[18:21] < streak_stats[15:18] - 1).all()
    tiny = image_statistics(torch.rand(2, 3, 1, 1))  # any size, finite
    assert tiny.shape == (2, 21) and torch.isfinite(tiny).all()
