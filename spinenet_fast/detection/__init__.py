"""RetinaNet detectors with SpineNet backbones, as torchvision ``RetinaNet`` models (registered with
``torchvision.models.get_model`` as ``retinanet_spinenet<id>``)."""

from .anchors import spinenet_anchor_generator
from .head import SpineNetRetinaNetHead
from .retinanet import SpineNetRetinaNet, retinanet_spinenet
from .torchvision_models import model_name as torchvision_model_name

__all__ = [
    "SpineNetRetinaNet",
    "SpineNetRetinaNetHead",
    "retinanet_spinenet",
    "spinenet_anchor_generator",
    "torchvision_model_name",
]
