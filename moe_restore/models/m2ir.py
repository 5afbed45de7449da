"""M2IR: an all-in-one restorer that suppresses degradations while encoding and removes what is
left while decoding (after Wang & Wang, arXiv 2603.14816; the paper publishes no code, the
layout below follows its text and the same lab's M2Restore conventions).

    x0 = conv3x3(I)                                         C channels
    encoder levels 1-3 and latent level 4 (C, 2C, 4C, 8C):  MST blocks
        MST: x = x + MambaStyleAttention(LN(x)); x = x + GatedDconvFFN(LN(x))
        down: conv3x3 (C -> C/2) + PixelUnshuffle(2)
    decoder levels 3, 2, 1:  up = conv3x3 (C -> 2C) + PixelShuffle(2), concat the skip
        (1x1 reduction at levels 3 and 2; level 1 keeps 2C, as Restormer), transposed-attention
        blocks, then ADEC (top-K degradation experts + shared expert, DGEA) routed by the
        degradation context c [B, P]
    refinement: transposed-attention blocks at 2C
    output = conv3x3(features) + I                          global residual

With ``degradation_heads`` there is one output head per degradation class t, and with
``input_filter`` = k each head adds a k x k filter F_t of the input:

    output = conv3x3_t(features) + F_t * I + I,   t = the label in training, else argmax class_logits

The context c comes from the jointly trained ``DegradationEncoder`` (which also classifies the
degradation) or from the caller (e.g. DA-CLIP's 512-d degradation features, with
``context_dim=512``). Any H x W: the input is padded (reflect) to a multiple of 8 and the output
cropped back. The output convs and input filters start at zero, so an untrained M2IR is the
identity map.

``run`` returns the restored image with an ``M2IRRecord`` (the degradation ``class_logits``: the
encoder's, or its classifier applied to the given context; each ADEC layer's ``MoERecord``; and
from them ``aux_loss``, the mean of the ADEC load-balancing losses) and keeps nothing; the
objective (``training_loss``) reads that record. ``forward`` returns the image and keeps the
record as ``last_record`` (read by the ``aux_loss`` and ``class_logits`` properties), with each
ADEC's record as that ADEC's, as the layers' own forwards do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_restore.layers.adec import ADEC
from moe_restore.layers.moe import MoERecord
from moe_restore.losses import LossWeights, restoration_loss
from moe_restore.layers.degradation_encoder import DegradationEncoder
from moe_restore.layers.mamba_attention import MambaStyleAttention
from moe_restore.layers.restormer_blocks import Downsample, TransformerBlock, TransposedAttention, Upsample

_MULTIPLE = 8  # three 2x downsamplings


@dataclass(frozen=True)
class M2IRConfig:
    """Hyper-parameters of M2IR (see ``moe_restore.models`` for the named configurations)."""

    dim: int = 48
    blocks: tuple[int, int, int, int] = (4, 6, 6, 8)
    refinement: int = 4
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion: float = 2.66
    num_experts: int = 6
    top_k: int = 2
    expert_expansion: float = 2.66
    d_state: int = 16
    expand: int = 2
    directions: int = 4
    context_dim: int = 512
    num_classes: int = 5
    encoder_width: int = 32
    degradation_heads: bool = False
    input_filter: int = 0
    backend: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class M2IRRecord:
    """One M2IR call: the degradation ``class_logits`` [B, num_classes] and ``experts``, the
    ``MoERecord`` of each ADEC layer (decoder order: levels 3, 2, 1)."""

    class_logits: torch.Tensor
    experts: tuple[MoERecord, ...]

    @property
    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss of the ADEC layers (float32 scalar)."""
        return torch.stack([record.losses.aux_loss for record in self.experts]).mean()


class M2IR(nn.Module):
    """The M2IR network (see the module docstring).

    ``forward(image [B, 3, H, W], context=None, labels=None)`` and ``run`` (the same arguments):
    ``context`` an external [B, P] degradation embedding instead of the encoder's; ``labels`` [B]
    the degradation classes, which pick the output heads in training (``degradation_heads``;
    ignored with a single head).
    """

    def __init__(self, config: M2IRConfig):
        super().__init__()
        if len(config.blocks) != 4 or len(config.heads) != 4:
            raise ValueError(f"blocks and heads must have 4 entries, got {config.blocks} and {config.heads}")
        if config.input_filter < 0 or (config.input_filter and config.input_filter % 2 == 0):
            raise ValueError(f"input_filter must be 0 or an odd size, got {config.input_filter}")
        self.config = config
        c = config.dim
        widths = (c, 2 * c, 4 * c, 8 * c)

        def mst(dim: int, n: int) -> nn.Sequential:
            return nn.Sequential(*[TransformerBlock(dim, MambaStyleAttention(
                dim, d_state=config.d_state, expand=config.expand, directions=config.directions,
                backend=config.backend), config.ffn_expansion) for _ in range(n)])

        def transposed(dim: int, heads: int, n: int) -> nn.Sequential:
            return nn.Sequential(*[TransformerBlock(dim, TransposedAttention(dim, heads), config.ffn_expansion)
                                   for _ in range(n)])

        def adec(dim: int) -> ADEC:
            return ADEC(dim, config.context_dim, num_experts=config.num_experts, top_k=config.top_k,
                        expansion=config.expert_expansion, backend=config.backend)

        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.encoders = nn.ModuleList(mst(widths[i], config.blocks[i]) for i in range(3))
        self.downs = nn.ModuleList(Downsample(widths[i]) for i in range(3))
        self.latent = mst(widths[3], config.blocks[3])
        # Decoder, deepest first: levels 3 and 2 reduce the concatenation to the level's width,
        # level 1 keeps 2C.
        self.ups = nn.ModuleList(Upsample(widths[i + 1]) for i in (2, 1, 0))
        self.reduces = nn.ModuleList([nn.Conv2d(widths[3], widths[2], 1, bias=False),
                                      nn.Conv2d(widths[2], widths[1], 1, bias=False), nn.Identity()])
        decoder_widths = (widths[2], widths[1], widths[1])
        self.decoders = nn.ModuleList(transposed(w, config.heads[i], config.blocks[i])
                                      for w, i in zip(decoder_widths, (2, 1, 0)))
        self.experts = nn.ModuleList(adec(w) for w in decoder_widths)
        self.refinement = transposed(widths[1], config.heads[0], config.refinement)
        # One output head per degradation class or a single one; each head is a 3x3 conv of the
        # features plus, with ``input_filter`` = k, a k x k filter of the input. Both start at
        # zero, so an untrained M2IR is the identity map.
        self.output_heads = config.num_classes if config.degradation_heads else 1
        self.output = nn.Conv2d(widths[1], 3 * self.output_heads, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.input_filter: nn.Conv2d | None = None
        if config.input_filter:
            k = config.input_filter
            self.input_filter = nn.Conv2d(3, 3 * self.output_heads, k, padding=k // 2, padding_mode="replicate",
                                          bias=False)
            nn.init.zeros_(self.input_filter.weight)
        self.degradation_encoder = DegradationEncoder(config.context_dim, config.num_classes,
                                                      width=config.encoder_width)
        self.last_record: M2IRRecord | None = None

    def _record(self) -> M2IRRecord:
        if self.last_record is None:
            raise RuntimeError("aux_loss and class_logits are defined after a forward pass")
        return self.last_record

    @property
    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss of the ADEC layers in the last forward."""
        return self._record().aux_loss

    @property
    def class_logits(self) -> torch.Tensor:
        """The degradation logits [B, num_classes] of the last forward."""
        return self._record().class_logits

    def training_loss(self, degraded: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor | None,
                      weights: LossWeights, *, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """``restoration_loss`` of the restored batch (Charbonnier + FFT + load balance +
        degradation classification, from the call's ``M2IRRecord``; the objective protocol of
        ``moe_restore.train.training_objective``). The labels also pick the output heads
        (``degradation_heads``). It draws nothing at random, so ``generator`` is unused."""
        restored, record = self.run(degraded, labels=labels)
        return restoration_loss(restored.float(), clean, weights=weights, aux_loss=record.aux_loss,
                                class_logits=record.class_logits, labels=labels, inputs=degraded)

    def forward(self, image: torch.Tensor, context: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The restored image of ``run``; its record becomes ``last_record``."""
        restored, self.last_record = self.run(image, context, labels)
        for adec, record in zip(self.experts, self.last_record.experts):
            adec.moe.last_record = record
        return restored

    def run(self, image: torch.Tensor, context: torch.Tensor | None = None,
            labels: torch.Tensor | None = None) -> tuple[torch.Tensor, M2IRRecord]:
        """(restored image [B, 3, H, W], the call's M2IRRecord); keeps nothing."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape [B, 3, H, W], got {tuple(image.shape)}")
        if context is None:
            context, class_logits = self.degradation_encoder(image)
        else:
            if context.shape != (image.shape[0], self.config.context_dim):
                raise ValueError(f"context must have shape [B, context_dim] = "
                                 f"{(image.shape[0], self.config.context_dim)}, got {tuple(context.shape)}")
            # A linear probe of the external context (the encoder's classifier), trained by the
            # classification loss; it picks the output head.
            class_logits = self.degradation_encoder.classifier(context)
        if labels is not None:
            # The range is checked only on the CPU, where it costs no device sync; on a GPU an index
            # out of range fails in the head selection (a device-side assert).
            out_of_range = labels.device.type == "cpu" and labels.numel() > 0 and not (
                0 <= int(labels.min()) and int(labels.max()) < self.config.num_classes)
            if labels.shape != (image.shape[0],) or labels.dtype != torch.long or out_of_range:
                raise ValueError(f"labels must be {image.shape[0]} class indices in [0, {self.config.num_classes})")
        h, w = image.shape[2:]
        pad_h, pad_w = -h % _MULTIPLE, -w % _MULTIPLE
        # Reflect padding needs the pad to be smaller than the side; tiny images fall back to
        # replicating the edge.
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)

        features = self.stem(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            features = encoder(features)
            skips.append(features)
            features = down(features)
        features = self.latent(features)
        records = []
        for up, reduce, decoder, experts, skip in zip(self.ups, self.reduces, self.decoders, self.experts,
                                                      reversed(skips)):
            features = reduce(torch.cat([up(features), skip], dim=1))
            features, record = experts.run(decoder(features), context)
            records.append(record)
        features = self.refinement(features)
        correction = self.output(features)
        if self.input_filter is not None:
            correction = correction + self.input_filter(x)
        if self.output_heads > 1:
            # Teacher forcing: in training each image takes its own degradation's head, so that a
            # head learns from its degradation only (mixing the heads by the posterior let the
            # strong haze and low-light corrections leak into blurred images); at inference the
            # most probable degradation's head.
            head = class_logits.argmax(-1) if labels is None else labels
            rows = torch.arange(head.shape[0], device=head.device)
            correction = correction.unflatten(1, (self.output_heads, 3))[rows, head]
        return (correction + x)[:, :, :h, :w], M2IRRecord(class_logits, tuple(records))
