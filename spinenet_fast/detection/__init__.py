"""RetinaNet detectors with SpineNet backbones, as torchvision ``RetinaNet`` models."""

from .head import SpineNetRetinaNetHead
from .retinanet import SpineNetRetinaNet, retinanet_spinenet, spinenet_anchor_generator

__all__ = ["SpineNetRetinaNet", "SpineNetRetinaNetHead", "retinanet_spinenet", "spinenet_anchor_generator"]
