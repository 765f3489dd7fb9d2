"""torchvision transforms v2 pipelines for training (scale jitter, flip, crop/pad to a square) and evaluation."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# Padding colour: the ImageNet mean, so padded pixels normalise to 0 as in the official pipeline.
MEAN_FILL = (124, 116, 104)


def train_transforms(image_size: int, scale_range: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """PIL image + target -> (3, image_size, image_size) float image in [0, 1] and the surviving boxes."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(),
            v2.ScaleJitter((image_size, image_size), scale_range=scale_range),
            v2.RandomCrop(image_size, pad_if_needed=True, fill={tv_tensors.Image: MEAN_FILL, "others": 0}),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transforms() -> v2.Compose:
    """PIL image + target -> (3, H, W) float image in [0, 1]; the detector resizes and pads it itself."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
