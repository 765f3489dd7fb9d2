"""Weights from elsewhere: official TF2 Model Garden RetinaNet-SpineNet checkpoints (``[tf]`` extra)."""

from .tf_checkpoint import TF_DETECTOR_KWARGS, from_tf_checkpoint, tf_detector

__all__ = ["TF_DETECTOR_KWARGS", "from_tf_checkpoint", "tf_detector"]
