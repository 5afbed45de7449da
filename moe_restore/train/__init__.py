"""Losses, metrics, checkpoints, the training loop, evaluation, inference and the demo."""
from moe_restore.train.evaluate import evaluate, markdown_table, write_results
from moe_restore.train.inference import load_model, restore_image
from moe_restore.losses import LossWeights, charbonnier, fft_loss, restoration_loss
from moe_restore.train.metrics import image_metrics, psnr, ssim
from moe_restore.train.trainer import TrainConfig, train

__all__ = [
    "LossWeights", "TrainConfig", "charbonnier", "evaluate", "fft_loss", "image_metrics", "load_model",
    "markdown_table", "psnr", "restoration_loss", "restore_image", "ssim", "train", "write_results",
]
