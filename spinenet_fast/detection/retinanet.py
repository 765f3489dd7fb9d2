"""RetinaNet with a SpineNet backbone (architecture.md §7), built from torchvision's detection parts.

The result is a ``torchvision.models.detection.RetinaNet``: it takes a list of (3, H, W) float images in
[0, 1] of any size and returns losses (training) or ``boxes``/``scores``/``labels`` in input coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet

from ..models.layers import make_norm_factory
from ..models.spinenet import SpineNet, SpineNetScaling, resolve_scaling
from ..ops.checks import describe
from .anchors import spinenet_anchor_generator
from .head import SpineNetRetinaNetHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# model_id -> (anchor_size, head convs, input size), architecture.md §2 and §7.
DETECTOR_DEFAULTS = {
    "49S": (3, 4, 640),
    "49": (3, 4, 640),
    "96": (3, 4, 1024),
    "143": (4, 4, 1280),
    "143L": (4, 4, 1280),
    "190": (4, 7, 1280),
}


class SpineNetRetinaNet(RetinaNet):
    """torchvision ``RetinaNet`` that checks training targets first and raises ``ValueError``/``TypeError``."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is not None:
            check_targets(images, targets)
        return super().forward(images, targets)


def check_targets(images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
    """Raise a clear error for targets that are not (K, 4) float boxes inside their image with int64 labels."""
    if len(images) != len(targets):
        raise ValueError(f"targets must have one dict per image: got {len(targets)} for {len(images)} images")
    for i, (image, target) in enumerate(zip(images, targets)):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise TypeError(f"targets[{i}]['boxes'] must be a float tensor of shape (K, 4), got {describe(boxes)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise TypeError(
                f"targets[{i}]['labels'] must be an int64 tensor of shape ({boxes.shape[0]},), got {describe(labels)}"
            )
        height, width = image.shape[-2:]
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        bad |= (boxes[:, :2] < 0).any(dim=1) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
        if bad.any():
            box = boxes[bad.nonzero()[0, 0]].tolist()
            raise ValueError(
                f"targets[{i}]['boxes'] must be (x1, y1, x2, y2) with x1 < x2, y1 < y2 inside the {width}×{height} "
                f"image, got {box}"
            )


def retinanet_spinenet(
    model_id: str | Mapping | SpineNetScaling = "49",
    num_classes: int = 91,
    *,
    image_size: int | None = None,
    anchor_size: float | None = None,
    anchor_style: str = "torchvision",
    head_num_convs: int | None = None,
    activation: str = "swish",
    norm_layer=None,
    bn_momentum: float = 0.01,
    bn_eps: float = 1e-3,
    stochastic_depth_rate: float | None = None,
    padding: str = "torch",
    fused: bool | str = "auto",
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    topk_candidates: int = 5000,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.5,
    **head_kwargs,
) -> SpineNetRetinaNet:
    """RetinaNet-SpineNet with the protocol-C recipe; every default can be overridden.

    ``image_size``: the square training/eval size (images are resized so the long side fits, then padded to a
    multiple of 128); defaults to the model id's published size. ``anchor_style``: ``"torchvision"`` or ``"tf"``
    (the official placement, see :mod:`~spinenet_fast.detection.anchors`). ``head_kwargs`` go to
    :class:`SpineNetRetinaNetHead` (loss weights, prior probability).
    A custom scaling dict as ``model_id`` uses anchor size 3, 4 head convs and 640 px unless overridden.
    """
    resolve_scaling(model_id)
    key = model_id.upper() if isinstance(model_id, str) else None
    default_anchor, default_convs, default_size = DETECTOR_DEFAULTS.get(key, (3, 4, 640))
    image_size = default_size if image_size is None else image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 128 or image_size % 128:
        raise ValueError(f"image_size must be a positive multiple of 128, got {image_size!r}")
    backbone = SpineNet(
        model_id,
        activation=activation,
        norm_layer=norm_layer,
        bn_momentum=bn_momentum,
        bn_eps=bn_eps,
        stochastic_depth_rate=stochastic_depth_rate,
        padding=padding,
        fused=fused,
    )
    anchor_generator = spinenet_anchor_generator(
        default_anchor if anchor_size is None else anchor_size, style=anchor_style
    )
    head = SpineNetRetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        num_convs=default_convs if head_num_convs is None else head_num_convs,
        activation=activation,
        norm=make_norm_factory(norm_layer, bn_momentum, bn_eps),
        **head_kwargs,
    )
    return SpineNetRetinaNet(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
        topk_candidates=topk_candidates,
        size_divisible=SpineNet.size_divisibility,
    )
