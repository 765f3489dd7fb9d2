"""Detectors with SpineNet backbones, as torchvision models: ``RetinaNet`` (registered with
``torchvision.models.get_model`` as ``retinanet_spinenet<id>``) and ``MaskRCNN`` (``maskrcnn_spinenet<id>``)."""

from .anchors import spinenet_anchor_generator
from .head import SpineNetRetinaNetHead
from .maskrcnn import SpineNetMaskRCNN, maskrcnn_spinenet
from .mobile import retinanet_spinenet_mobile
from .retinanet import SpineNetRetinaNet, retinanet_spinenet
from .torchvision_models import model_name as torchvision_model_name

__all__ = [
    "SpineNetMaskRCNN",
    "SpineNetRetinaNet",
    "SpineNetRetinaNetHead",
    "maskrcnn_spinenet",
    "retinanet_spinenet",
    "retinanet_spinenet_mobile",
    "spinenet_anchor_generator",
    "torchvision_model_name",
]
