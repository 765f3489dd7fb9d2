"""spinenet-fast: a drop-in PyTorch SpineNet backbone whose cross-scale connections run as fused kernels."""

from . import detection  # noqa: F401  (registers retinanet_spinenet* and maskrcnn_spinenet* with torchvision.models.get_model)
from .models import SCALING_MAP, SpineNet, SpineNetClassifier, SpineNetMobile, SpineNetScaling

__version__ = "0.1.0"
__all__ = ["SCALING_MAP", "SpineNet", "SpineNetClassifier", "SpineNetMobile", "SpineNetScaling", "__version__"]
