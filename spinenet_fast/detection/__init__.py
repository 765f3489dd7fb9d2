"""RetinaNet detectors with SpineNet backbones, as torchvision ``RetinaNet`` models."""

from .anchors import spinenet_anchor_generator
from .head import SpineNetRetinaNetHead
from .retinanet import SpineNetRetinaNet, retinanet_spinenet

__all__ = ["SpineNetRetinaNet", "SpineNetRetinaNetHead", "retinanet_spinenet", "spinenet_anchor_generator"]
