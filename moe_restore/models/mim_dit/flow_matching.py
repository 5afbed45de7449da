"""MiM-DiT's training objective (rectified flow), the model's ``training_loss``.

x_t = (1 - t) x_0 + t eps, t ~ U(0, 1); the network predicts v = eps - x_0 from (x_t, y, 1000 t);

    loss = ||v_hat - v||^2 + lambda_lb * sum over the MoE layers of both routing levels' balance loss
         + lambda_cls * (CE(classifier, label) + CE(mean group probabilities, label))

with lambda_lb and lambda_cls the ``LossWeights`` (load_balance, classification). The group
cross-entropy supervises the Inter-MoE router: the label of an image is also the index of the
expert group meant for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_restore.losses import LossWeights


def flow_matching_loss(model, degraded: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor | None = None,
                       weights: LossWeights = LossWeights(), generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Rectified-flow loss of ``model`` (a MiMDiT) on a batch of degraded/clean images [B, 3, H, W]
    in [0, 1] (the objective protocol of ``moe_restore.train.training_objective``). ``labels`` [B]:
    degradation index per image (-1: composite or unknown, no classification terms). Returns
    (loss, its terms as floats); ``weights.fft`` is unused."""
    with torch.no_grad():
        x0, cond = model.encode(clean), model.encode(degraded)
    t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    context, class_logits = model.degradation_context(degraded)
    v = model(xt, cond, 1000 * t, context)
    terms = {"flow": F.mse_loss(v.float(), (noise - x0).float())}
    if weights.load_balance:
        terms["load_balance"] = weights.load_balance * torch.stack([m.aux_loss for m in model.moe_layers]).sum()
    known = labels >= 0 if labels is not None else None
    if weights.classification and known is not None and bool(known.any()):
        group_probs = torch.stack([m.group_probs.reshape(x0.shape[0], -1, model.config.groups).mean(1)
                                   for m in model.moe_layers]).mean(0)
        terms["group_ce"] = weights.classification * F.nll_loss(group_probs[known].clamp_min(1e-8).log(),
                                                                labels[known])
        if class_logits is not None:
            terms["classification"] = weights.classification * F.cross_entropy(class_logits[known].float(),
                                                                               labels[known])
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}
