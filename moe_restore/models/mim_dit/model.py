"""MiM-DiT: a diffusion transformer whose feed-forward layers are MoE-in-MoE, for all-in-one
image restoration.

Backbone: a diffusers ``DiTTransformer2DModel`` (adaLN-zero ``BasicTransformerBlock``s). Each
block's dense FFN becomes a ``NestedMoE``: an Inter-MoE router picks k_g of G expert groups (one
per major degradation: haze, rain, noise, blur, low light) and an Intra-MoE router picks k_e of E
sub-experts inside each chosen group. Both routers also read a per-image degradation embedding
(the ``DegradationEncoder``, or an external [B, P] embedding such as DA-CLIP's).

Conditioning on the degraded image y: channel concatenation [x_t ; y] at the patch embedding,
in pixel space, or in the latent space of a diffusers ``AutoencoderKL`` when one is given. The new
input channels start at zero, and every expert starts as a copy of the dense FFN (or the dense FFN
becomes the shared expert and the routed experts start at zero output), so the upcycled model
initially computes exactly what the pretrained DiT computed.

The objective (``flow_matching.py``), the sampler (``sampling.py``) and persistence
(``persistence.py``) are methods of ``MiMDiT`` implemented beside it.

Diffusers calls a block's feed-forward as ``ff(hidden_states)``, with no other argument (and
``cross_attention_kwargs`` reach only the attention processors), so ``MiMDiT.forward`` hands the
degradation context to its MoE feed-forward layers through the model's ``DegradationScope``: the
context is held for the duration of that one forward and forgotten after it, even when the forward
raises. No module keeps it, and a feed-forward layer whose routers read a context raises when it
runs outside its model's forward.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_restore.layers.degradation_encoder import DegradationEncoder
from moe_restore.layers.nested_moe import NestedMoE

from . import flow_matching, persistence, sampling


@dataclass(frozen=True)
class MiMDiTConfig:
    """Sizes of a MiM-DiT built from scratch (``MiMDiT(config)``); ``from_pretrained_dit`` takes
    the backbone sizes from the pretrained DiT instead."""

    hidden: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 2
    sample_size: int = 32  # the DiT's native grid (in pixels or latents); other sizes work too
    sample_channels: int = 3  # channels of x_0: 3 in pixel space, the VAE's latent channels otherwise
    cond_channels: int = 3
    groups: int = 5
    experts_per_group: int = 4
    top_k_groups: int = 2
    top_k_experts: int = 1
    context_dim: int = 64  # degradation embedding width the routers read (0: routers see tokens only)
    encoder_width: int = 32
    num_classes: int = 5  # degradation types the classifier (and the group supervision) knows
    ffn_init: str = "upcycle"  # "upcycle": experts copy the dense FFN; "shared": it is the shared expert
    noise_std: float = 0.0
    sample_steps: int = 8
    backend: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DegradationScope:
    """Hands the degradation context of one ``MiMDiT.forward`` to that model's feed-forward layers.

    ``with scope.active(context):`` makes ``context`` (a [B, P] tensor or None) what
    ``scope.context()`` returns until the block exits, and forgets it on exit (also when the block
    raises); outside the block ``context()`` raises, and so does entering a second block while one
    is open. A plain slot rather than a ``contextvars`` variable, so that ``torch.compile`` traces
    the model without graph breaks; like the MoE layers' records it is state of the model, so one
    model runs one forward at a time.
    """

    __slots__ = ("_context", "_open")

    def __init__(self) -> None:
        self._context: torch.Tensor | None = None
        self._open = False

    @contextmanager
    def active(self, context: torch.Tensor | None) -> Iterator[None]:
        if self._open:
            raise RuntimeError("a MiMDiT forward is already running on this model")
        self._context, self._open = context, True
        try:
            yield
        finally:
            self._context, self._open = None, False

    def context(self) -> torch.Tensor | None:
        """The context of the open ``active`` block."""
        if not self._open:
            raise RuntimeError("a MiM-DiT feed-forward layer whose routers read the degradation context runs "
                               "only inside its MiMDiT.forward, which hands it the context")
        return self._context


class _DegradationRoutedFFN(nn.Module):
    """The block's ``ff``: a NestedMoE whose routers read the per-image context of the running
    ``MiMDiT.forward``, from the model's ``scope`` (diffusers calls ``ff(hidden_states)``)."""

    def __init__(self, moe: NestedMoE, scope: DegradationScope):
        super().__init__()
        self.moe, self.scope = moe, scope

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.moe.router.context_dim:
            return self.moe(hidden_states)
        return self.moe(hidden_states, self.scope.context())


def _dense_ffn_layers(ff: nn.Module) -> tuple[nn.Linear, nn.Linear, str]:
    """(linear1, linear2, activation) of a diffusers FeedForward: net = [GELU(proj), Dropout, Linear]."""
    act = ff.net[0]
    approximate = getattr(act, "approximate", None)
    if not hasattr(act, "proj") or approximate not in ("none", "tanh"):
        raise TypeError(f"expected a diffusers FeedForward with a GELU input layer, got {type(act).__name__}")
    return act.proj, ff.net[2], "gelu_tanh" if approximate == "tanh" else "gelu"


def dit_class():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as error:  # pragma: no cover - diffusers is a dependency
        raise ImportError("MiM-DiT needs diffusers: pip install diffusers") from error
    return DiTTransformer2DModel


class MiMDiT(nn.Module):
    """MiM-DiT over images [B, 3, H, W] (pixel space) or VAE latents; see the module docstring.

    Build from scratch with ``MiMDiT(MiMDiTConfig(...))`` (a randomly initialised DiT, then the
    same upcycling), from a pretrained diffusers DiT with ``from_pretrained_dit``, or reload with
    ``from_pretrained``. ``vae``: an optional diffusers ``AutoencoderKL`` (frozen) for latent space.
    """

    def __init__(self, config: MiMDiTConfig = MiMDiTConfig(), *, dit: nn.Module | None = None,
                 vae: nn.Module | None = None):
        super().__init__()
        if config.ffn_init not in ("upcycle", "shared"):
            raise ValueError(f"ffn_init must be 'upcycle' or 'shared', got {config.ffn_init!r}")
        if dit is None:
            dit = dit_class()(num_attention_heads=config.heads, attention_head_dim=config.hidden // config.heads,
                               in_channels=config.sample_channels, num_layers=config.depth,
                               sample_size=config.sample_size, patch_size=config.patch)
        self.config = config
        self.dit = dit
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self._widen_patch_embedding(config.cond_channels)
        self.scope = DegradationScope()
        for block in dit.transformer_blocks:
            block.ff = _DegradationRoutedFFN(self._nested_ffn(block.ff), self.scope)
        self.degradation_encoder = (DegradationEncoder(config.context_dim, config.num_classes,
                                                       width=config.encoder_width, in_channels=3)
                                    if config.context_dim else None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained_dit(cls, path: str | Path, *, vae: nn.Module | None = None, **options: Any) -> "MiMDiT":
        """Load a diffusers DiT (``DiTTransformer2DModel.from_pretrained(path)``: a local directory, or
        a hub id where a hub is reachable) and upcycle it. ``options`` are MiMDiTConfig fields other
        than the backbone's sizes (groups, experts_per_group, top_k_groups, top_k_experts,
        context_dim, ffn_init, noise_std, ...)."""
        dit = dit_class().from_pretrained(path)
        return cls(_config_of(dit, **options), dit=dit, vae=vae)

    def _widen_patch_embedding(self, cond_channels: int) -> None:
        """Append ``cond_channels`` zero-initialised input channels to the patch projection."""
        proj = self.dit.pos_embed.proj
        widened = nn.Conv2d(proj.in_channels + cond_channels, proj.out_channels, proj.kernel_size,
                            stride=proj.stride, bias=proj.bias is not None).to(proj.weight)
        with torch.no_grad():
            widened.weight.zero_()
            widened.weight[:, :proj.in_channels].copy_(proj.weight)
            if proj.bias is not None:
                widened.bias.copy_(proj.bias)
        self.dit.pos_embed.proj = widened

    def _nested_ffn(self, ff: nn.Module) -> NestedMoE:
        c = self.config
        linear1, linear2, activation = _dense_ffn_layers(ff)
        options = dict(activation=activation, group_context_dim=c.context_dim, backend=c.backend)
        if c.ffn_init == "upcycle":
            return NestedMoE.from_dense(linear1, linear2, c.groups, c.experts_per_group, c.top_k_groups,
                                        c.top_k_experts, noise_std=c.noise_std, **options)
        # "shared": the dense FFN is the shared expert; routed experts start at zero output.
        moe = NestedMoE(linear1.in_features, linear2.in_features, c.groups, c.experts_per_group, c.top_k_groups,
                        c.top_k_experts, num_shared_experts=1, out_dim=linear2.out_features,
                        bias=linear1.bias is not None, **options).to(linear1.weight)
        moe.shared_expert.copy_dense_(linear1, linear2)
        moe.experts.zero_output_()
        return moe

    # ------------------------------------------------------------------ the network

    @property
    def moe_layers(self) -> list[NestedMoE]:
        return [block.ff.moe for block in self.dit.transformer_blocks]

    @property
    def null_class(self) -> int:
        """The DiT's label-dropout class: the model runs unconditionally on class labels."""
        return self.dit.config.num_embeds_ada_norm

    def degradation_context(self, degraded_image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(embedding [B, P], class logits [B, num_classes]) of the degraded image (pixels)."""
        if self.degradation_encoder is None:
            return None, None
        return self.degradation_encoder(degraded_image)

    def forward(self, noisy: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor,
                context: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity prediction for x_t ``noisy`` [B, C_s, H, W] given the condition ``cond``
        [B, C_c, H, W] (degraded image or its latents), DiT timesteps [B] (1000 t) and the
        degradation ``context`` [B, P] (required when ``context_dim`` > 0; handed to the MoE
        feed-forward layers for this forward only, see ``DegradationScope``). Any H x W: padded
        to the patch grid and cropped back."""
        B, _, H, W = noisy.shape
        if self.config.context_dim and context is None:
            raise ValueError(f"context [B, context_dim={self.config.context_dim}] is required: the routers read it")
        p = self.config.patch
        x = torch.cat([noisy, cond.to(noisy.dtype)], dim=1)
        pad_h, pad_w = (-H) % p, (-W) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        if class_labels is None:
            class_labels = torch.full((B,), self.null_class, dtype=torch.long, device=x.device)
        timestep = timestep.to(x.device, torch.float32).expand(B)
        with self.scope.active(context):
            out = self._dit_forward(x, timestep, class_labels)
        return out[:, :self.config.sample_channels, :H, :W]

    def _dit_forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """DiTTransformer2DModel.forward with an unpatchify that also handles non-square grids."""
        dit, p = self.dit, self.config.patch
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        hidden = dit.pos_embed(x)
        for block in dit.transformer_blocks:
            hidden = block(hidden, timestep=timestep, class_labels=class_labels)
        conditioning = dit.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden.dtype)
        shift, scale = dit.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden = dit.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = dit.proj_out_2(hidden)
        c = dit.out_channels
        hidden = hidden.reshape(-1, grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", hidden).reshape(-1, c, grid_h * p, grid_w * p)

    # ------------------------------------------------------------------ latent space

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the space the DiT works in (pixels in [-1, 1], or VAE latents)."""
        x = image * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode``, clamped to [0, 1]."""
        if self.vae is not None:
            sample = self.vae.decode(sample / self.vae.config.scaling_factor).sample
        return ((sample + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ objective, sampling, persistence

    training_loss = flow_matching.flow_matching_loss
    restore = sampling.restore
    save_pretrained = persistence.save_pretrained
    from_pretrained = classmethod(persistence.from_pretrained)


def _config_of(dit: nn.Module, **options: Any) -> MiMDiTConfig:
    """A MiMDiTConfig whose backbone fields are read off a loaded DiT."""
    cfg = dit.config
    backbone = dict(hidden=cfg.num_attention_heads * cfg.attention_head_dim, depth=cfg.num_layers,
                    heads=cfg.num_attention_heads, patch=cfg.patch_size, sample_size=cfg.sample_size,
                    sample_channels=cfg.in_channels)
    clash = sorted(set(options) & set(backbone))
    if clash:
        raise TypeError(f"{clash} come from the pretrained DiT and cannot be overridden")
    return MiMDiTConfig(**backbone, **options)
