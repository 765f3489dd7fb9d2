"""RetinaNet with a SpineNet backbone (architecture.md §7), built from torchvision's detection parts.

The result is a ``torchvision.models.detection.RetinaNet``: it takes a list of (3, H, W) float images in
[0, 1] of any size and returns losses (training) or ``boxes``/``scores``/``labels`` in input coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet

from ..models.layers import check_choice, make_norm_factory
from ..models.spinenet import SpineNet, SpineNetScaling, resolve_scaling
from ..ops.checks import describe
from .anchors import ANCHOR_STYLES, spinenet_anchor_generator
from .head import SpineNetRetinaNetHead
from .matching import match_anchors, pad_targets

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
    """torchvision ``RetinaNet`` that checks training targets first and raises ``ValueError``/``TypeError``; where
    its head's loss is fused, the anchors of the whole batch are matched at once (same matches as torchvision's
    per-image ``Matcher``) and the loss runs as one fused op."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is not None:
            targets = checked_targets(images, targets, self.head.num_classes)
        return super().forward(images, targets)

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        if not self.head.uses_fused_loss(head_outputs["cls_logits"].device):
            return super().compute_loss(targets, head_outputs, anchors)
        boxes, labels, valid = pad_targets(targets)
        anchors = torch.stack(anchors)
        dtype = torch.promote_types(anchors.dtype, boxes.dtype)  # box_iou's promotion (bf16 anchors under autocast)
        matcher = self.proposal_matcher
        matched = match_anchors(
            anchors.to(dtype), boxes.to(dtype), valid, matcher.high_threshold, matcher.low_threshold,
            matcher.allow_low_quality_matches,
        )  # fmt: skip
        return self.head.loss_from_matches(head_outputs, anchors, matched, boxes, labels)


def checked_targets(images: list[Tensor], targets: list[dict[str, Tensor]], num_classes: int) -> list[dict]:
    """The targets with float boxes and int64 labels, as torchvision's RetinaNet takes them (integer boxes and labels
    of any integer dtype accepted, boxes past the image edge too); a clear error for what torchvision rejects
    (degenerate boxes) and what is invalid: not (K, 4) boxes with K labels, non-finite boxes, labels outside
    [0, ``num_classes``). The caller's dicts are not modified. The value checks run on the whole batch at once: a
    fixed number of launches and one host sync per step, whatever the batch size."""
    if len(images) != len(targets):
        raise ValueError(f"targets must have one dict per image: got {len(targets)} for {len(images)} images")
    checked = []
    for i, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        real = isinstance(boxes, Tensor) and not boxes.is_complex() and boxes.dtype != torch.bool
        if not real or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise TypeError(f"targets[{i}]['boxes'] must be a real tensor of shape (K, 4), got {describe(boxes)}")
        integer = isinstance(labels, Tensor) and not (labels.is_floating_point() or labels.is_complex())
        if not integer or labels.dtype == torch.bool or labels.shape != boxes.shape[:1]:
            raise TypeError(
                f"targets[{i}]['labels'] must be an integer tensor of shape ({boxes.shape[0]},), got {describe(labels)}"
            )
        checked.append(
            {**target, "boxes": boxes if boxes.is_floating_point() else boxes.float(), "labels": labels.long()}
        )
    if checked and len({(t["boxes"].dtype, t["boxes"].device) for t in checked}) == 1:
        boxes = torch.cat([t["boxes"] for t in checked])
        labels = torch.cat([t["labels"] for t in checked]).to(boxes.device)
        bad = ~boxes.isfinite().all(1) | (boxes[:, 2:] <= boxes[:, :2]).any(1) | (labels < 0) | (labels >= num_classes)
        if not bad.any():  # the one sync
            return checked
    for i, target in enumerate(checked):  # a bad value (or mixed dtypes or devices): find it, image by image
        _check_target_values(i, target["boxes"], target["labels"], num_classes)
    return checked


def _check_target_values(i: int, boxes: Tensor, labels: Tensor, num_classes: int) -> None:
    """``ValueError`` naming ``targets[i]`` for a non-finite or degenerate box or a label outside [0, num_classes)."""
    if not boxes.isfinite().all():
        raise ValueError(f"targets[{i}]['boxes'] must be finite, got {boxes[~boxes.isfinite().all(1)][0].tolist()}")
    degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
    if degenerate.any():
        raise ValueError(
            f"targets[{i}]['boxes'] must be (x1, y1, x2, y2) with x1 < x2 and y1 < y2, got "
            f"{boxes[degenerate][0].tolist()}"
        )
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(
            f"targets[{i}]['labels'] must be class indices in [0, {num_classes}), got {labels[outside][0].item()}"
        )


def check_detector_args(anchor_size, head_num_convs, score_thresh, nms_thresh, detections_per_img, topk_candidates,
                        fg_iou_thresh, bg_iou_thresh) -> None:  # fmt: skip
    """``ValueError`` naming the argument for a detector setting no model can use."""
    if anchor_size is not None and not (isinstance(anchor_size, (int, float)) and 0 < anchor_size < math.inf):
        raise ValueError(f"anchor_size must be a finite positive number (or None), got {anchor_size!r}")
    counts = (("head_num_convs", head_num_convs, 0), ("detections_per_img", detections_per_img, 1),
              ("topk_candidates", topk_candidates, 1))  # fmt: skip
    for name, value, least in counts:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh), ("fg_iou_thresh", fg_iou_thresh),
                        ("bg_iou_thresh", bg_iou_thresh)):  # fmt: skip
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if bg_iou_thresh > fg_iou_thresh:
        raise ValueError(f"bg_iou_thresh ({bg_iou_thresh}) must not exceed fg_iou_thresh ({fg_iou_thresh})")


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
    _skip_resize: bool = False,
    **head_kwargs,
) -> SpineNetRetinaNet:
    """RetinaNet-SpineNet with the protocol-C recipe; every default can be overridden.

    ``image_size``: the square training/eval size (images are resized so the long side fits, then padded to a
    multiple of 128); defaults to the model id's published size. ``anchor_style``: ``"torchvision"`` or ``"tf"``
    (the official placement, see :mod:`~spinenet_fast.detection.anchors`). ``head_kwargs`` go to
    :class:`SpineNetRetinaNetHead` (loss weights, prior probability). ``_skip_resize``: torchvision's flag (its
    references set it for multiscale / LSJ augmentation) that keeps training images at the size the transforms made.
    A custom scaling dict as ``model_id`` uses anchor size 3, 4 head convs and 640 px unless overridden.
    """
    resolve_scaling(model_id)
    check_choice("anchor_style", anchor_style, ANCHOR_STYLES)
    check_detector_args(anchor_size, head_num_convs, score_thresh, nms_thresh, detections_per_img, topk_candidates,
                        fg_iou_thresh, bg_iou_thresh)  # fmt: skip
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
        fused=fused,
        **head_kwargs,
    )
    settings = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img,
                "fg_iou_thresh": fg_iou_thresh, "bg_iou_thresh": bg_iou_thresh, "topk_candidates": topk_candidates,
                "_skip_resize": _skip_resize}  # fmt: skip
    return assemble_retinanet(backbone, head, anchor_generator, num_classes, image_size, settings)


def assemble_retinanet(backbone, head, anchor_generator, num_classes: int, image_size: int,
                       settings: dict) -> SpineNetRetinaNet:  # fmt: skip
    """The torchvision RetinaNet of these parts: square ``image_size`` images (long side resized to it, padded to a
    multiple of 128), ImageNet normalisation; ``settings``: RetinaNet's inference and matching keywords."""
    return SpineNetRetinaNet(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        anchor_generator=anchor_generator,
        head=head,
        size_divisible=SpineNet.size_divisibility,
        **settings,
    )
