"""The training losses, as the trainer imports them; they live in ``moe_restore.losses``, below
the models, which declare their objectives with them."""
from moe_restore.losses import LossWeights, charbonnier, fft_loss, restoration_loss

__all__ = ["LossWeights", "charbonnier", "fft_loss", "restoration_loss"]
