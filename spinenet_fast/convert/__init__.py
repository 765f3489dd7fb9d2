"""Weights from elsewhere: official TF2 Model Garden RetinaNet- and Mask R-CNN-SpineNet and RetinaNet-SpineNet-Mobile
checkpoints (``[tf]`` extra)."""

from .tf_checkpoint import (
    TF_DETECTOR_KWARGS,
    from_tf_checkpoint,
    from_tf_maskrcnn_checkpoint,
    tf_detector,
    tf_maskrcnn,
)
from .tf_mobile import from_tf_mobile_retinanet_checkpoint, from_tf_spinenet_mobile_checkpoint, tf_mobile_detector

__all__ = [
    "TF_DETECTOR_KWARGS",
    "from_tf_checkpoint",
    "from_tf_maskrcnn_checkpoint",
    "from_tf_mobile_retinanet_checkpoint",
    "from_tf_spinenet_mobile_checkpoint",
    "tf_detector",
    "tf_maskrcnn",
    "tf_mobile_detector",
]
