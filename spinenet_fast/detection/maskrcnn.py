"""Mask R-CNN with a SpineNet backbone, as the official models define it, built from torchvision's parts.

The configuration is TF Model Garden's ``maskrcnn_spinenet_coco`` experiment with the TPU repo's per-model
``configs/spinenet/spinenet{49s,49,96,143}_mrcnn.yaml`` (the published models): P3–P7 straight from the backbone
(no FPN), ReLU, no stochastic depth, BN (momentum 0.01 in PyTorch terms, ε 1e-3) after every conv and dense layer
of every head; RPN anchors of size 3·2^l, aspect ratios (0.5, 1, 2), one scale; one shared 3×3 RPN conv; RoI align
7×7 (boxes) and 14×14 (masks) with one sample per bin (Model Garden's ``sample_offset`` 0.5) over P3–P7, the FPN
level rule; box head 4 convs + 1 dense layer, mask head 4 convs + a 2×2 transposed conv, per-class boxes and masks;
Model Garden's proposal, sampling and detection settings. The heads' conv width is the backbone's endpoint width and
the dense layer 4× that, the image size the RetinaNet detector's — which is what the official models use:

======  ===========  ========================  ==========
id      image size   head convs / dense width  parameters (91 classes)
======  ===========  ========================  ==========
49S     640          128 / 512                 13,946,608
49      640          256 / 1024                40,753,521
96      1024         256 / 1024                55,185,009
143     1280         256 / 1024                79,169,649
======  ===========  ========================  ==========

The parameter counts are Model Garden's own models built with these settings (the TPU repo's ``MODEL_ZOO.md``
rounds them to 40.8 / 55.2 / 79.2 M; it publishes none for 49S). SpineNet-190's official Mask R-CNN (7 head convs
of 384, swish, stochastic depth) is not preset: pass its settings.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from ..models.layers import make_norm_factory
from ..models.spinenet import SpineNet, SpineNetScaling, resolve_scaling
from ..ops.checks import describe
from .anchors import spinenet_anchor_generator
from .maskrcnn_heads import SpineNetBoxHead, SpineNetMaskHead, SpineNetMaskPredictor, SpineNetRPNHead, box_predictor
from .retinanet import DETECTOR_DEFAULTS, IMAGENET_MEAN, IMAGENET_STD, check_detector_args, checked_targets

FC_DIMS_PER_FILTER = 4  # the box head's dense width per head conv filter (official: 512 / 128, 1024 / 256)
ANCHOR_SIZE = 3.0
LEVELS = ("p3", "p4", "p5", "p6", "p7")


class SpineNetMaskRCNN(MaskRCNN):
    """torchvision ``MaskRCNN`` that checks training targets first (boxes, labels and (K, H, W) masks of each
    image) and raises ``ValueError``/``TypeError`` naming the bad entry."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is not None:
            targets = checked_targets(images, targets, self.roi_heads.box_predictor.cls_score.out_features)
            for i, (image, target) in enumerate(zip(images, targets)):
                masks, size = target.get("masks"), (len(target["boxes"]), *image.shape[-2:])
                if not isinstance(masks, Tensor) or masks.is_complex() or tuple(masks.shape) != size:
                    raise TypeError(f"targets[{i}]['masks'] must be a real tensor of shape {size}, got "
                                    f"{describe(masks)}")  # fmt: skip
        return super().forward(images, targets)


def maskrcnn_spinenet(
    model_id: str | Mapping | SpineNetScaling = "49",
    num_classes: int = 91,
    *,
    image_size: int | None = None,
    anchor_style: str = "torchvision",
    activation: str = "relu",
    norm_layer=None,
    bn_momentum: float = 0.01,
    bn_eps: float = 1e-3,
    stochastic_depth_rate: float = 0.0,
    padding: str = "torch",
    fused: bool | str = "auto",
    head_num_filters: int | None = None,
    fc_dims: int | None = None,
    rpn_num_convs: int = 1,
    box_num_convs: int = 4,
    mask_num_convs: int = 4,
    _skip_resize: bool = False,
    **maskrcnn_kwargs,
) -> SpineNetMaskRCNN:
    """Mask R-CNN-SpineNet with the official configuration (module docstring); every default can be overridden.

    ``image_size``: the square training/eval size (long side resized to it, padded to a multiple of 128).
    ``anchor_style``: ``"torchvision"`` or ``"tf"`` (Model Garden's placement, for converted checkpoints).
    ``maskrcnn_kwargs`` go to torchvision's ``MaskRCNN`` (``rpn_*``, ``box_*`` settings), over the official ones.
    """
    resolve_scaling(model_id)
    key = model_id.upper() if isinstance(model_id, str) else None
    image_size = DETECTOR_DEFAULTS.get(key, (3, 4, 640))[2] if image_size is None else image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 128 or image_size % 128:
        raise ValueError(f"image_size must be a positive multiple of 128, got {image_size!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    for name, value, least in (("head_num_filters", head_num_filters, 1), ("fc_dims", fc_dims, 1),
                               ("rpn_num_convs", rpn_num_convs, 1), ("box_num_convs", box_num_convs, 0),
                               ("mask_num_convs", mask_num_convs, 0)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    backbone = SpineNet(model_id, activation=activation, norm_layer=norm_layer, bn_momentum=bn_momentum,
                        bn_eps=bn_eps, stochastic_depth_rate=stochastic_depth_rate, padding=padding,
                        fused=fused)  # fmt: skip
    norm = make_norm_factory(norm_layer, bn_momentum, bn_eps)
    anchors = spinenet_anchor_generator(ANCHOR_SIZE, num_scales=1, style=anchor_style)
    channels = backbone.out_channels
    width = channels if head_num_filters is None else head_num_filters
    dims = FC_DIMS_PER_FILTER * width if fc_dims is None else fc_dims
    settings = {
        "rpn_pre_nms_top_n_train": 2000, "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_test": 1000, "rpn_nms_thresh": 0.7, "rpn_fg_iou_thresh": 0.7, "rpn_bg_iou_thresh": 0.3,
        "rpn_batch_size_per_image": 256, "rpn_positive_fraction": 0.5, "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5, "box_detections_per_img": 100, "box_fg_iou_thresh": 0.5, "box_bg_iou_thresh": 0.5,
        "box_batch_size_per_image": 512, "box_positive_fraction": 0.25,
    }  # fmt: skip
    settings.update(maskrcnn_kwargs)
    check_detector_args(ANCHOR_SIZE, 0, settings["box_score_thresh"], settings["box_nms_thresh"],
                        settings["box_detections_per_img"], 1, settings["box_fg_iou_thresh"],
                        settings["box_bg_iou_thresh"])  # fmt: skip
    box_head = SpineNetBoxHead(channels, 7, num_convs=box_num_convs, num_filters=width, fc_dims=dims, norm=norm,
                               activation=activation)  # fmt: skip
    mask_head = SpineNetMaskHead(channels, num_convs=mask_num_convs, num_filters=width, norm=norm,
                                 activation=activation)  # fmt: skip
    mask_channels = width if mask_num_convs else channels
    rpn_head = SpineNetRPNHead(channels, anchors.num_anchors_per_location()[0], num_convs=rpn_num_convs, norm=norm,
                               activation=activation)  # fmt: skip
    return SpineNetMaskRCNN(
        backbone,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        size_divisible=SpineNet.size_divisibility,
        _skip_resize=_skip_resize,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS), 7, sampling_ratio=1),
        box_head=box_head,
        box_predictor=box_predictor(box_head.out_channels, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, sampling_ratio=1),
        mask_head=mask_head,
        mask_predictor=SpineNetMaskPredictor(mask_channels, num_classes, norm=norm, activation=activation),
        **settings,
    )
