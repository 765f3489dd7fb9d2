"""Weights from elsewhere: official TF2 Model Garden RetinaNet- and Mask R-CNN-SpineNet checkpoints (``[tf]`` extra)."""

from .tf_checkpoint import (
    TF_DETECTOR_KWARGS,
    from_tf_checkpoint,
    from_tf_maskrcnn_checkpoint,
    tf_detector,
    tf_maskrcnn,
)

__all__ = ["TF_DETECTOR_KWARGS", "from_tf_checkpoint", "from_tf_maskrcnn_checkpoint", "tf_detector", "tf_maskrcnn"]
