"""RetinaNet with a SpineNet-Mobile backbone, as TF Model Garden's ``retinanet_mobile_coco`` experiment builds it.

SpineNet-Mobile 49 / 49S / 49XS (:class:`~spinenet_fast.models.SpineNetMobile`: swish, stochastic depth 0.2, TF
``SAME`` padding) and a RetinaNet head of separable convs (4 per tower, as wide as the endpoints: 48 / 40 / 24; BN per
level), anchor size 3 with 3 scales × ratios (0.5, 1, 2), images of 384 px (49XS: 256), the protocol-C losses and
inference settings of :func:`~spinenet_fast.detection.retinanet_spinenet`. Trainable parameters with 91 classes equal
Model Garden's own models: 2,337,579 / 1,030,653 / 872,711 (the paper rounds Mobile-49's to 2.32 M).
"""

from __future__ import annotations

from ..models.layers import check_choice, make_norm_factory
from ..models.spinenet_mobile import MOBILE_BN, MOBILE_SCALING_MAP, SpineNetMobile
from .anchors import ANCHOR_STYLES, spinenet_anchor_generator
from .head import SpineNetRetinaNetHead
from .retinanet import SpineNetRetinaNet, assemble_retinanet, check_detector_args

MOBILE_IMAGE_SIZES = {"49": 384, "49S": 384, "49XS": 256}
ANCHOR_SIZE = 3.0
HEAD_NUM_CONVS = 4


def retinanet_spinenet_mobile(
    model_id: str = "49",
    num_classes: int = 91,
    *,
    image_size: int | None = None,
    anchor_style: str = "torchvision",
    activation: str = "swish",
    norm_layer=None,
    bn_momentum: float = MOBILE_BN["bn_momentum"],
    bn_eps: float = MOBILE_BN["bn_eps"],
    stochastic_depth_rate: float = 0.2,
    padding: str = "tf_same",
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
    """RetinaNet-SpineNet-Mobile ``model_id`` (module docstring); every default can be overridden. ``head_kwargs``
    go to :class:`SpineNetRetinaNetHead` (``num_convs``, loss weights). ``fused``: the backbone's cross-scale
    connections and the loss (the separable-conv head runs eagerly)."""
    key = model_id.upper() if isinstance(model_id, str) else model_id
    if key not in MOBILE_SCALING_MAP:
        raise ValueError(f"model_id must be one of {list(MOBILE_SCALING_MAP)}, got {model_id!r}")
    check_choice("anchor_style", anchor_style, ANCHOR_STYLES)
    check_detector_args(ANCHOR_SIZE, head_kwargs.get("num_convs"), score_thresh, nms_thresh, detections_per_img,
                        topk_candidates, fg_iou_thresh, bg_iou_thresh)  # fmt: skip
    image_size = MOBILE_IMAGE_SIZES[key] if image_size is None else image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 128 or image_size % 128:
        raise ValueError(f"image_size must be a positive multiple of 128, got {image_size!r}")
    backbone = SpineNetMobile(key, activation=activation, norm_layer=norm_layer, bn_momentum=bn_momentum,
                              bn_eps=bn_eps, stochastic_depth_rate=stochastic_depth_rate, padding=padding,
                              fused=fused)  # fmt: skip
    anchor_generator = spinenet_anchor_generator(ANCHOR_SIZE, style=anchor_style)
    head = SpineNetRetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        **{"num_convs": HEAD_NUM_CONVS, **head_kwargs},
        activation=activation,
        norm=make_norm_factory(norm_layer, bn_momentum, bn_eps),
        separable=True,
        fused=fused,
    )
    settings = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img,
                "fg_iou_thresh": fg_iou_thresh, "bg_iou_thresh": bg_iou_thresh, "topk_candidates": topk_candidates,
                "_skip_resize": _skip_resize}  # fmt: skip
    return assemble_retinanet(backbone, head, anchor_generator, num_classes, image_size, settings)
